//! The command line: `unionfs mount|umount ...`, and the calling convention
//! of fuse-overlayfs and mount.fuse (`unionfs [SOURCE] MOUNTPOINT -o ...`)
//! used by fstab, `mount -t fuse.unionfs` and containers/storage.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{MountRequest, apply_options, parse_threads};

#[derive(Debug, Parser)]
#[command(
    name = "unionfs",
    version,
    about = "Overlay filesystem in userspace: read-only lower layers under one writable upper",
    long_about = "Overlay filesystem in userspace, with kernel overlayfs semantics and on-disk format.\n\n\
        Also runs as a mount helper: `unionfs [SOURCE] MOUNTPOINT -o lowerdir=A:B,upperdir=U,workdir=W`\n\
        (the form used by fstab, `mount -t fuse.unionfs` and podman's overlay.mount_program)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the merged view of the layers on MOUNTPOINT
    Mount(MountArgs),
    /// Unmount a unionfs mount and wait for its daemon to exit
    #[command(alias = "unmount")]
    Umount(UmountArgs),
    /// Load, save, list, inspect and remove images in the image store
    Image(ImageArgs),
    /// Create, mount, list and remove containers (a writable layer over an image)
    Container(ContainerArgs),
    /// Store-wide information (disk usage)
    System(SystemArgs),
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The image store [default: /var/lib/unionfs as root, else
    /// $XDG_DATA_HOME/unionfs or ~/.local/share/unionfs]
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Load images from a docker-archive or oci-archive tar (`docker save`,
    /// `podman save [--format oci-archive]`)
    Load {
        /// Read the archive from FILE instead of stdin
        #[arg(short = 'i', long = "input", value_name = "FILE")]
        input: Option<PathBuf>,
        /// No progress bar and no per-layer lines
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Write an image as a docker-archive or oci-archive (gzip layers)
    /// that `podman load` and `docker load` take
    Save {
        /// NAME[:TAG] or (short) ID
        image: String,
        /// Write the archive to FILE instead of stdout
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ArchiveFormat::DockerArchive)]
        format: ArchiveFormat,
        /// No progress bar
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// List images: NAME:TAG, ID, created, size
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Show an image's layers and the steps that made them
    History {
        /// NAME[:TAG] or (short) ID
        image: String,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Show an image's config, layers (diff_ids) and size as JSON
    Inspect {
        /// NAME[:TAG] or (short) ID
        image: String,
    },
    /// Remove an image (or one of its tags) and the layers no image uses any more
    #[command(alias = "remove")]
    Rm {
        /// NAME[:TAG] or (short) ID
        image: String,
    },
}

#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// The image store (as for `unionfs image`)
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ContainerCommand,
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Create a container: a writable layer over an image's layers
    Create {
        /// [a-zA-Z0-9][a-zA-Z0-9_.-]*, unique in the store
        #[arg(long, value_name = "NAME")]
        name: String,
        /// NAME[:TAG] or (short) ID
        image: String,
    },
    /// Mount a container's merged view on MOUNTPOINT (returns once mounted)
    Mount {
        name: String,
        mountpoint: PathBuf,
        /// Mount options as for `unionfs mount` (ro, volatile, nodev, ...)
        #[arg(short = 'o', value_name = "OPT[,OPT...]")]
        options: Vec<String>,
    },
    /// Unmount a container and wait for its daemon to exit
    #[command(alias = "unmount")]
    Umount {
        name: String,
        /// Detach now even if busy and return
        #[arg(short = 'l', long)]
        lazy: bool,
        /// Seconds to wait for the daemon to exit (not with --lazy)
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// List containers: name, image, created, where mounted, upper size
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Remove an unmounted container and its writable layer
    #[command(alias = "remove")]
    Rm { name: String },
    /// What the container changed (A added, C changed, D deleted), as `podman diff`
    Diff {
        name: String,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Make an image of the container: its image's layers and a new one from its upper
    Commit {
        name: String,
        /// IMAGE[:TAG] (tag `latest` when none is given)
        image: String,
        /// The history comment of the new layer
        #[arg(short = 'm', long, value_name = "MESSAGE")]
        message: Option<String>,
        /// The image's author
        #[arg(long, value_name = "AUTHOR")]
        author: Option<String>,
        /// No progress, only the new image's ID
        #[arg(short = 'q', long)]
        quiet: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveFormat {
    DockerArchive,
    OciArchive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct SystemArgs {
    /// The image store (as for `unionfs image`)
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(subcommand)]
    pub command: SystemCommand,
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Space used by images and layers: size, shared, unique, reclaimable
    Df {
        /// Per image and per layer
        #[arg(short = 'v', long)]
        verbose: bool,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Read-only layers, colon-separated; the leftmost is the topmost
    #[arg(long, value_name = "DIR[:DIR...]")]
    pub lower: Option<String>,
    /// Writable layer; without it the mount is read-only
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Work directory on the upper's filesystem
    /// [default: <parent of upper>/.<upper name>.unionfs-work]
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Where to mount the merged view
    pub mountpoint: PathBuf,
    /// Mount options (lowerdir=, upperdir=, workdir=, ro, volatile, nopassthrough, ...)
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// Stay in the foreground instead of returning once mounted
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// FUSE worker threads [default: one per CPU]
    #[arg(long, value_name = "N", value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Log at debug level (RUST_LOG overrides)
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Write the daemon's log here (a detached daemon has no terminal)
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// Detach now even if busy and return; the daemon exits when the last
    /// user goes
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// Seconds to wait for the daemon to exit (not with --lazy)
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

impl MountArgs {
    pub fn into_request(self) -> Result<MountRequest, String> {
        let mut req = MountRequest::default();
        for opts in &self.options {
            apply_options(&mut req, opts).map_err(|e| e.0)?;
        }
        if let Some(lower) = &self.lower {
            let mut from_flag = MountRequest::default();
            apply_options(
                &mut from_flag,
                &format!("lowerdir={}", lower.replace(',', "\\,")),
            )
            .map_err(|e| e.0)?;
            req.lowers = from_flag.lowers;
        }
        if self.upper.is_some() {
            req.upper = self.upper;
        }
        if self.work.is_some() {
            req.work = self.work;
        }
        req.mountpoint = self.mountpoint;
        req.foreground |= self.foreground;
        req.threads = self.threads.or(req.threads);
        req.debug |= self.debug;
        req.log_file = self.log_file;
        Ok(req)
    }
}

/// What the process was asked to do.
#[derive(Debug)]
pub enum Invocation {
    Mount(MountRequest),
    Umount(UmountArgs),
    Image(ImageArgs),
    Container(ContainerArgs),
    System(SystemArgs),
}

/// Whether argv uses the subcommand form (otherwise the mount-helper form).
fn uses_subcommands(args: &[OsString]) -> bool {
    match args.get(1).and_then(|a| a.to_str()) {
        None => true,
        Some(first) => matches!(
            first,
            "mount"
                | "umount"
                | "unmount"
                | "image"
                | "container"
                | "system"
                | "help"
                | "--help"
                | "-h"
                | "--version"
                | "-V"
        ),
    }
}

/// Parses the mount-helper form: `[SOURCE] MOUNTPOINT` with `-o OPTS`
/// (also `-oOPTS`), `-f`, `-d` anywhere.
fn parse_helper_form(args: &[OsString]) -> Result<MountRequest, String> {
    let mut req = MountRequest::default();
    let mut positional = Vec::new();
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "-o" => {
                let opts = iter.next().ok_or("-o needs an argument")?;
                apply_options(&mut req, &opts.to_string_lossy()).map_err(|e| e.0)?;
            }
            "-f" | "--foreground" => req.foreground = true,
            "-d" | "--debug" => req.debug = true,
            "-s" | "-n" | "-v" | "--" => {}
            s if s.starts_with("-o") => apply_options(&mut req, &s[2..]).map_err(|e| e.0)?,
            s if s.starts_with('-') => {
                return Err(format!("unknown flag '{s}' (see unionfs --help)"));
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    match positional.len() {
        1 => req.mountpoint = positional.remove(0),
        2 => {
            req.source = Some(positional[0].to_string_lossy().into_owned());
            req.mountpoint = positional.remove(1);
        }
        0 => return Err("no mountpoint given (see unionfs --help)".into()),
        _ => {
            return Err(
                "too many arguments: expected [SOURCE] MOUNTPOINT (see unionfs --help)".into(),
            );
        }
    }
    Ok(req)
}

pub fn parse(args: Vec<OsString>) -> Result<Invocation, clap::Error> {
    if !uses_subcommands(&args) {
        return parse_helper_form(&args)
            .map(Invocation::Mount)
            .map_err(|msg| clap::Error::raw(clap::error::ErrorKind::InvalidValue, msg + "\n"));
    }
    let cli = Cli::try_parse_from(args)?;
    Ok(match cli.command {
        Command::Mount(m) => {
            Invocation::Mount(m.into_request().map_err(|msg| {
                clap::Error::raw(clap::error::ErrorKind::InvalidValue, msg + "\n")
            })?)
        }
        Command::Umount(u) => Invocation::Umount(u),
        Command::Image(i) => Invocation::Image(i),
        Command::Container(c) => Invocation::Container(c),
        Command::System(s) => Invocation::System(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn subcommand_form() {
        let Invocation::Mount(req) = parse(args(&[
            "unionfs", "mount", "--lower", "a:b", "--upper", "u", "/mnt", "-o", "ro",
        ]))
        .unwrap() else {
            panic!("not a mount")
        };
        assert_eq!(req.lowers, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(req.upper, Some(PathBuf::from("u")));
        assert_eq!(req.mountpoint, PathBuf::from("/mnt"));
        assert!(req.options.read_only);
    }

    #[test]
    fn podman_helper_form() {
        let Invocation::Mount(req) = parse(args(&[
            "unionfs",
            "-o",
            "lowerdir=l/A:l/B,upperdir=/d/diff,workdir=/d/work,,volatile",
            "/d/merged",
        ]))
        .unwrap() else {
            panic!("not a mount")
        };
        assert_eq!(req.lowers, vec![PathBuf::from("l/A"), PathBuf::from("l/B")]);
        assert_eq!(req.mountpoint, PathBuf::from("/d/merged"));
        assert!(req.options.volatile);
        assert_eq!(req.source, None);
    }

    #[test]
    fn mount_fuse_helper_form() {
        let Invocation::Mount(req) = parse(args(&[
            "unionfs",
            "unionfs",
            "/mnt",
            "-o",
            "rw,lowerdir=/a,dev,suid",
        ]))
        .unwrap() else {
            panic!("not a mount")
        };
        assert_eq!(req.source.as_deref(), Some("unionfs"));
        assert_eq!(req.mountpoint, PathBuf::from("/mnt"));
        assert_eq!(req.lowers, vec![PathBuf::from("/a")]);
    }

    #[test]
    fn image_commands_parse_with_root_anywhere() {
        let Invocation::Image(image) = parse(args(&[
            "unionfs", "image", "load", "--root", "/s", "-i", "a.tar", "--quiet",
        ]))
        .unwrap() else {
            panic!("not an image command")
        };
        assert_eq!(image.root, Some(PathBuf::from("/s")));
        assert!(matches!(
            image.command,
            ImageCommand::Load { quiet: true, .. }
        ));
        let Invocation::System(system) =
            parse(args(&["unionfs", "system", "--root", "/s", "df", "-v"])).unwrap()
        else {
            panic!("not a system command")
        };
        assert!(matches!(
            system.command,
            SystemCommand::Df {
                verbose: true,
                format: OutputFormat::Table
            }
        ));
    }

    #[test]
    fn container_commands_parse() {
        let Invocation::Container(c) = parse(args(&[
            "unionfs",
            "container",
            "mount",
            "c1",
            "/mnt",
            "-o",
            "ro",
            "--root",
            "/s",
        ]))
        .unwrap() else {
            panic!("not a container command")
        };
        assert_eq!(c.root, Some(PathBuf::from("/s")));
        assert!(matches!(
            c.command,
            ContainerCommand::Mount { ref name, ref options, .. } if name == "c1" && options == &["ro"]
        ));
        let Invocation::Container(c) = parse(args(&[
            "unionfs",
            "container",
            "create",
            "--name",
            "c1",
            "img:1",
        ]))
        .unwrap() else {
            panic!("not a container command")
        };
        assert!(matches!(
            c.command,
            ContainerCommand::Create { ref name, ref image } if name == "c1" && image == "img:1"
        ));
    }

    #[test]
    fn helper_form_without_mountpoint_is_refused() {
        assert!(parse(args(&["unionfs", "-o", "lowerdir=/a"])).is_err());
    }
}
