//! Images on unionfs: a content-addressed store of OCI/docker image layers
//! that unionfs mounts as lower layers, and the `unionfs image ...` and
//! `unionfs system df` commands.
//!
//! This tree sits above the filesystem core: it only writes plain
//! directories that `unionfs mount --lower` reads; nothing in `overlay` or
//! `fuse` knows about it.
//!
//! * [`digest`]: sha256 digests and the hashing reader (one pass over a stream).
//! * [`store`]: the on-disk layout, its lock, the index, temp work dirs.
//! * [`archive`]: reading docker-archive and oci-archive tars into a load plan.
//! * [`unpack`]: extracting one layer tar over directory descriptors.
//! * [`load`], [`save`], [`query`], [`remove`], [`df`]: the commands.
//! * [`container`]: containers (an upper and work dir over an image's
//!   layers) and the `unionfs container ...` commands.
//! * [`output`]: human sizes, tables, the terminal check.
//! * [`changes`]: what a container changed, as `podman diff` reports it.
//! * [`layer_tar`]: the OCI layer tar of an upper (deterministic, hashed
//!   while written), for `container commit`.
//! * [`commit`]: `container diff` and `container commit`.

pub mod archive;
pub mod changes;
pub mod commit;
pub mod container;
pub mod df;
pub mod digest;
pub mod layer_tar;
pub mod load;
pub mod output;
pub mod query;
pub mod remove;
pub mod save;
pub mod store;
pub mod unpack;

/// Every failure of an image command: one line for the user.
pub type Result<T> = std::result::Result<T, String>;

/// Adds what was being done to an error, so the one line names it.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

use crate::cli::{
    ArchiveFormat, ContainerArgs, ContainerCommand, ImageArgs, ImageCommand, OutputFormat,
    SystemArgs, SystemCommand,
};

fn open_store(root: Option<std::path::PathBuf>) -> Result<store::Store> {
    let root = match root {
        Some(root) => root,
        None => store::default_root()?,
    };
    store::Store::open(&root)
}

/// Runs `unionfs image ...`.
pub fn run_image(args: ImageArgs) -> Result<()> {
    let store = open_store(args.root)?;
    match args.command {
        ImageCommand::Load { input, quiet } => {
            load::load(&store, &load::LoadOptions { input, quiet })
        }
        ImageCommand::Save {
            image,
            output,
            format,
            quiet,
        } => save::save(
            &store,
            &save::SaveOptions {
                image,
                output,
                format: match format {
                    ArchiveFormat::DockerArchive => save::SaveFormat::DockerArchive,
                    ArchiveFormat::OciArchive => save::SaveFormat::OciArchive,
                },
                quiet,
            },
        ),
        ImageCommand::Ls { format } => query::ls(&store, format == OutputFormat::Json),
        ImageCommand::History { image, format } => {
            query::history(&store, &image, format == OutputFormat::Json)
        }
        ImageCommand::Inspect { image } => query::inspect(&store, &image),
        ImageCommand::Rm { image } => remove::rm(&store, &image),
    }
}

/// Runs `unionfs system ...`.
pub fn run_system(args: SystemArgs) -> Result<()> {
    let store = open_store(args.root)?;
    match args.command {
        SystemCommand::Df { verbose, format } => {
            df::df(&store, verbose, format == OutputFormat::Json)
        }
    }
}

/// Runs `unionfs container ...`.
pub fn run_container(args: ContainerArgs) -> Result<()> {
    let store = open_store(args.root)?;
    match args.command {
        ContainerCommand::Create { name, image } => container::create(&store, &name, &image),
        ContainerCommand::Mount {
            name,
            mountpoint,
            options,
        } => container::mount(&store, &name, &mountpoint, &options),
        ContainerCommand::Umount {
            name,
            lazy,
            timeout,
        } => container::umount(&store, &name, lazy, timeout),
        ContainerCommand::Ls { format } => container::ls(&store, format == OutputFormat::Json),
        ContainerCommand::Rm { name } => container::rm(&store, &name),
        ContainerCommand::Diff { name, format } => {
            commit::diff(&store, &name, format == OutputFormat::Json)
        }
        ContainerCommand::Commit {
            name,
            image,
            message,
            author,
            quiet,
        } => commit::commit(
            &store,
            &commit::CommitOptions {
                name: &name,
                reference: &image,
                message: message.as_deref(),
                author: author.as_deref(),
                quiet,
            },
        ),
    }
}
