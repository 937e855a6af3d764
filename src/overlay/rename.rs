//! rename(2) on the merged tree in three parts: the facts are gathered
//! (lookups, stats, the redirects directories would need), a plan is made
//! from them without a single syscall (`plan`, unit-tested), and a short
//! executor carries it out. Every step of a plan leaves an upper that reads
//! as the old or the new state, as kernel overlayfs' own sequence does:
//! markers are set where they change nothing yet, and the change itself is
//! one rename, one exchange, or an exchange that first turns a target a
//! directory cannot replace into one it can.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, renameat2};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::Overlay;
use super::attr::Attr;
use super::copyup::{CopyData, TempEntry, copy_xattrs, set_owner_mode_times};
use super::error::{Error, Result, SysContext};
use super::layer::{list_dir, open_beneath};
use super::marker;
use super::node::{DirLayer, DirStack, Node};
use super::workdir::WorkDir;
use crate::sys::{self, XattrTarget};

/// What rename should do (renameat2 flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// One side of a rename as the plan needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Side {
    pub is_dir: bool,
    /// A directory that lower layers contribute to: it moves with a
    /// redirect to where they keep it.
    pub merged: bool,
    /// Empty in the merged view (only asked of a directory to be replaced).
    pub empty: bool,
}

/// What the upper already holds at the target name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpperTarget {
    Nothing,
    /// A whiteout, or a file: rename(2) replaces it, except by a directory.
    NonDir,
    /// A directory with no entries on disk: rename(2) replaces it.
    EmptyDir,
    /// A directory empty in the merged view that still holds whiteouts.
    DirWithWhiteouts,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub mode: RenameMode,
    pub src: Side,
    pub dst: Option<Side>,
    /// Both names are one object (hard links).
    pub same_object: bool,
    pub src_parent_merged: bool,
    pub dst_parent_merged: bool,
    /// A lower layer holds the old name, which must stay hidden.
    pub src_name_in_lower: bool,
    pub upper_target: UpperTarget,
    /// Directories that lower layers contribute to may move (with a
    /// redirect); not in the `userxattr` format, as in kernel overlayfs.
    pub moves_merged_dirs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Src,
    Dst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    CopyUp(Which),
    SetRedirect(Which),
    /// A directory landing in a merged parent must never merge with a
    /// lower directory of its new name.
    MarkOpaque(Which),
    Exchange,
    /// A directory onto a whiteout: the two trade places, and the whiteout
    /// is then removed unless the old name needs one.
    ExchangeWithWhiteout {
        keep_whiteout: bool,
    },
    /// Replaces the target directory by an empty opaque one in one exchange.
    ClearTarget,
    /// rename(2), with a whiteout left at the old name when needed.
    Move {
        whiteout: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// rename(2) of a name onto another name of the same file.
    Nothing,
    Refuse(Errno),
    Steps(Vec<Step>),
}

/// The steps of a rename, from the facts alone.
pub(crate) fn plan(f: &Facts) -> Plan {
    let exchange = f.mode == RenameMode::Exchange;
    if f.same_object && !exchange {
        return Plan::Nothing;
    }
    match (f.dst, f.mode) {
        (Some(_), RenameMode::NoReplace) => return Plan::Refuse(Errno::EEXIST),
        (None, RenameMode::Exchange) => return Plan::Refuse(Errno::ENOENT),
        _ => {}
    }
    if let Some(dst) = f.dst
        && !exchange
    {
        match (f.src.is_dir, dst.is_dir) {
            (true, false) => return Plan::Refuse(Errno::ENOTDIR),
            (false, true) => return Plan::Refuse(Errno::EISDIR),
            _ => {}
        }
    }
    // The kernel's order: the VFS checks above, then overlayfs' EXDEV for
    // directories it may not move, then whether the target is empty.
    let immovable = |side: Side| side.is_dir && side.merged && !f.moves_merged_dirs;
    if immovable(f.src) || (exchange && f.dst.is_some_and(immovable)) {
        return Plan::Refuse(Errno::EXDEV);
    }
    if let Some(dst) = f.dst
        && !exchange
        && f.src.is_dir
        && !dst.empty
    {
        return Plan::Refuse(Errno::ENOTEMPTY);
    }
    let moves_into_merged =
        |side: Side, parent_merged: bool| side.is_dir && !side.merged && parent_merged;
    let mut steps = vec![Step::CopyUp(Which::Src)];
    if exchange {
        steps.push(Step::CopyUp(Which::Dst));
    }
    if f.src.is_dir && f.src.merged {
        steps.push(Step::SetRedirect(Which::Src));
    }
    if let Some(dst) = f.dst
        && exchange
        && dst.is_dir
        && dst.merged
    {
        steps.push(Step::SetRedirect(Which::Dst));
    }
    if moves_into_merged(f.src, f.dst_parent_merged) {
        steps.push(Step::MarkOpaque(Which::Src));
    }
    if exchange {
        if let Some(dst) = f.dst
            && moves_into_merged(dst, f.src_parent_merged)
        {
            steps.push(Step::MarkOpaque(Which::Dst));
        }
        steps.push(Step::Exchange);
        return Plan::Steps(steps);
    }
    let whiteout = f.src_name_in_lower;
    match f.upper_target {
        UpperTarget::NonDir if f.src.is_dir => steps.push(Step::ExchangeWithWhiteout {
            keep_whiteout: whiteout,
        }),
        UpperTarget::DirWithWhiteouts => {
            steps.push(Step::ClearTarget);
            steps.push(Step::Move { whiteout });
        }
        _ => steps.push(Step::Move { whiteout }),
    }
    Plan::Steps(steps)
}

/// A looked-up side of the rename, where it is and what it needs.
struct Party<'a> {
    node: &'a Arc<Node>,
    name: &'a OsStr,
    /// The redirect it would carry after the move (merged directories),
    /// computed before any copy-up, which does not copy redirects.
    redirect: Option<OsString>,
}

impl Overlay {
    /// Renames (or exchanges) `parent/name` and `new_parent/new_name`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        marker::refuse_oci_marker(new_name)?;
        let src = self.peek(parent, name)?;
        let dst = match self.peek(new_parent, new_name) {
            Ok(peeked) => Some(peeked),
            Err(e) if e.errno() == Errno::ENOENT => None,
            Err(e) => return Err(e),
        };
        let src_parent = self.node(parent)?;
        let dst_parent = self.node(new_parent)?;
        let src_side = self.side(&src.node, &src.attr, false)?;
        let dst_side = match &dst {
            Some(d) => {
                let replaced_dir = mode != RenameMode::Exchange && src.attr.is_dir();
                Some(self.side(&d.node, &d.attr, replaced_dir)?)
            }
            None => None,
        };
        let facts = Facts {
            mode,
            src: src_side,
            dst: dst_side,
            same_object: dst.as_ref().is_some_and(|d| d.id == src.id),
            src_parent_merged: self.is_merged_stack(&*src_parent.dir_stack()?),
            dst_parent_merged: self.is_merged_stack(&*dst_parent.dir_stack()?),
            src_name_in_lower: self.lower_entry(&*src_parent.dir_stack()?, name)?.is_some(),
            upper_target: self.upper_target(&dst_parent, new_name)?,
            moves_merged_dirs: self.format.moves_merged_dirs(),
        };
        let steps = match plan(&facts) {
            Plan::Nothing => return Ok(()),
            Plan::Refuse(errno) => return Err(Error::new(errno, "rename")),
            Plan::Steps(steps) => steps,
        };
        let src_party = Party {
            node: &src.node,
            name,
            redirect: self.redirect_if(src_side, &src.node, parent, new_parent, name)?,
        };
        let dst_party = match (&dst, dst_side) {
            (Some(d), Some(side)) if mode == RenameMode::Exchange => Some(Party {
                node: &d.node,
                name: new_name,
                redirect: self.redirect_if(side, &d.node, new_parent, parent, new_name)?,
            }),
            _ => None,
        };
        let src_stack = self.upper_dir(&src_parent)?;
        let dst_stack = self.upper_dir(&dst_parent)?;
        for step in steps {
            self.run_step(
                step,
                &src_party,
                dst_party.as_ref(),
                &src_stack,
                &dst_stack,
                new_name,
            )
            .map_err(|e| e.with_path(src.path()))?;
        }

        // Bring the node table, the directories' ways back to their
        // descriptors and the lookup cache up to date.
        src.rename(parent, name, &dst_parent, new_name);
        relocate_upper_dir(&src, &dst_stack, new_name);
        if let Some(dnode) = &dst {
            if mode == RenameMode::Exchange {
                dnode.rename(new_parent, new_name, &src_parent, name);
                relocate_upper_dir(dnode, &src_stack, name);
            } else if dnode.remove_name(new_parent, new_name) {
                self.invalidate_attr(dnode.id);
            } else {
                dnode.mark_unlinked(Some(dnode.attr));
            }
        }
        self.forget_dentry(parent, name);
        self.forget_dentry(new_parent, new_name);
        Ok(())
    }

    fn side(&self, node: &Arc<Node>, attr: &Attr, replaced_dir: bool) -> Result<Side> {
        let is_dir = attr.is_dir();
        Ok(Side {
            is_dir,
            merged: is_dir && self.dir_has_lower(node)?,
            empty: replaced_dir && is_dir && self.is_empty_dir(node)?,
        })
    }

    fn redirect_if(
        &self,
        side: Side,
        node: &Arc<Node>,
        old_parent: u64,
        new_parent: u64,
        old_name: &OsStr,
    ) -> Result<Option<OsString>> {
        if !(side.is_dir && side.merged) {
            return Ok(None);
        }
        self.redirect_for(node, old_parent, new_parent, old_name)
            .map(Some)
    }

    /// What the upper holds at `parent/name` (nothing while the parent has
    /// no upper copy yet).
    fn upper_target(&self, parent: &Arc<Node>, name: &OsStr) -> Result<UpperTarget> {
        let stack = parent.dir_stack()?;
        let top = stack.top();
        if !self.is_upper(top.layer) {
            return Ok(UpperTarget::Nothing);
        }
        let dir = top.fd()?;
        let existing =
            match nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Attr::from_stat(&st),
                Err(Errno::ENOENT) => return Ok(UpperTarget::Nothing),
                Err(e) => return Err(e).sys("fstatat(rename target)"),
            };
        if !existing.is_dir() {
            return Ok(UpperTarget::NonDir);
        }
        let target = open_beneath(dir.as_fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .sys("openat2(rename target)")?;
        Ok(if list_dir(target.as_fd())?.is_empty() {
            UpperTarget::EmptyDir
        } else {
            UpperTarget::DirWithWhiteouts
        })
    }

    fn run_step(
        &self,
        step: Step,
        src: &Party<'_>,
        dst: Option<&Party<'_>>,
        src_stack: &DirStack,
        dst_stack: &DirStack,
        new_name: &OsStr,
    ) -> Result<()> {
        let party = |which| match which {
            Which::Src => Ok(src),
            Which::Dst => dst.ok_or_else(|| Error::new(Errno::ENOENT, "rename")),
        };
        let (src_dir, dst_dir) = (src_stack.top(), dst_stack.top());
        match step {
            Step::CopyUp(which) => self.copy_up(party(which)?.node, CopyData::All),
            Step::SetRedirect(which) => {
                let p = party(which)?;
                match &p.redirect {
                    Some(redirect) => self.set_redirect(p.node, redirect),
                    None => Ok(()),
                }
            }
            Step::MarkOpaque(which) => {
                let (dir, n) = self.upper_location(party(which)?.node)?;
                self.mark_opaque(XattrTarget::Entry(dir.top().fd()?.as_fd(), &n))
            }
            Step::Exchange => renameat2(
                src_dir.fd()?.as_fd(),
                src.name,
                dst_dir.fd()?.as_fd(),
                new_name,
                RenameFlags::RENAME_EXCHANGE,
            )
            .sys("renameat2(exchange)"),
            Step::ExchangeWithWhiteout { keep_whiteout } => {
                renameat2(
                    src_dir.fd()?.as_fd(),
                    src.name,
                    dst_dir.fd()?.as_fd(),
                    new_name,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .sys("renameat2(exchange with whiteout)")?;
                if keep_whiteout {
                    return Ok(());
                }
                unlinkat(src_dir.fd()?.as_fd(), src.name, UnlinkatFlags::NoRemoveDir)
                    .sys("unlinkat(whiteout)")
            }
            Step::ClearTarget => self.clear_empty_dir(self.work()?, dst_dir, new_name),
            Step::Move { whiteout } => {
                self.move_entry(src_dir, src.name, dst_dir, new_name, whiteout)
            }
        }
    }

    /// Renames `src_dir/name` to `dst_dir/new_name`, replacing what is there,
    /// and leaves a whiteout at the old name when `whiteout`: in one step
    /// with RENAME_WHITEOUT where the upper's filesystem can.
    fn move_entry(
        &self,
        src_dir: &DirLayer,
        name: &OsStr,
        dst_dir: &DirLayer,
        new_name: &OsStr,
        whiteout: bool,
    ) -> Result<()> {
        if whiteout && self.chardev_whiteouts() {
            match renameat2(
                src_dir.fd()?.as_fd(),
                name,
                dst_dir.fd()?.as_fd(),
                new_name,
                RenameFlags::RENAME_WHITEOUT,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EINVAL | Errno::EPERM) => {}
                Err(e) => return Err(e).sys("renameat2(whiteout)"),
            }
        }
        renameat2(
            src_dir.fd()?.as_fd(),
            name,
            dst_dir.fd()?.as_fd(),
            new_name,
            RenameFlags::empty(),
        )
        .sys("renameat2")?;
        if whiteout {
            self.make_whiteout(src_dir.fd()?.as_fd(), name, src_dir)?;
        }
        Ok(())
    }

    /// Makes the upper directory `dir/name`, empty in the merged view, empty
    /// on disk too: an empty opaque directory with its attributes takes its
    /// place in one exchange (kernel overlayfs' `ovl_clear_empty`), and the
    /// old one, with the whiteouts it held, goes from the work dir.
    fn clear_empty_dir(&self, work: &WorkDir, dir: &DirLayer, name: &OsStr) -> Result<()> {
        let dirfd = dir.fd()?;
        let existing = nix::sys::stat::fstatat(dirfd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .sys("fstatat(rename target)")?;
        let tmp = TempEntry::new(work);
        mkdirat(
            tmp.fd(),
            tmp.name.as_os_str(),
            Mode::from_bits_truncate(0o700),
        )
        .sys("mkdirat(clear target)")?;
        copy_xattrs(
            XattrTarget::Entry(dirfd.as_fd(), name),
            XattrTarget::Entry(tmp.fd(), &tmp.name),
        )?;
        self.mark_opaque(XattrTarget::Entry(tmp.fd(), &tmp.name))?;
        set_owner_mode_times(tmp.fd(), &tmp.name, &Attr::from_stat(&existing))?;
        tmp.swap_with(dir, name)
    }

    /// Whether lower layers contribute to the directory node (or hold its
    /// name, which a move would have to keep hidden).
    fn dir_has_lower(&self, node: &Arc<Node>) -> Result<bool> {
        Ok(self.is_merged_stack(&*node.dir_stack()?))
    }

    /// The redirect a directory needs when it moves from `old_parent/old_name`
    /// to `new_parent`: the name or path where the lower layers keep it.
    fn redirect_for(
        &self,
        node: &Arc<Node>,
        old_parent: u64,
        new_parent: u64,
        old_name: &OsStr,
    ) -> Result<std::ffi::OsString> {
        let own = self
            .current_redirect(node)?
            .unwrap_or_else(|| old_name.to_os_string());
        if old_parent == new_parent || own.as_bytes().starts_with(b"/") {
            return Ok(own);
        }
        // An absolute path: each ancestor by its redirect or its name, up to
        // the root or an ancestor that has an absolute redirect itself.
        let mut parts = vec![own];
        let mut dir = self.node(old_parent)?;
        while let Some(up) = dir.parent() {
            let part = self.current_redirect(&dir)?.unwrap_or_else(|| dir.name());
            let absolute = part.as_bytes().starts_with(b"/");
            parts.push(part);
            if absolute {
                break;
            }
            dir = up;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev() {
            if !part.as_bytes().starts_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(part.as_bytes());
        }
        Ok(OsStr::from_bytes(&path).to_os_string())
    }

    /// The redirect a directory node carries now, if any.
    fn current_redirect(&self, node: &Arc<Node>) -> Result<Option<std::ffi::OsString>> {
        let stack = node.dir_stack()?;
        if !self.is_upper(stack.top().layer) {
            return Ok(stack.top().marks.redirect.as_ref().and_then(|r| r.value()));
        }
        for name in [marker::TRUSTED_REDIRECT, marker::USER_REDIRECT] {
            let value = sys::get_xattr(XattrTarget::Fd(stack.top().fd()?.as_fd()), name)
                .sys("getxattr(redirect)")?;
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                return Ok(Some(OsStr::from_bytes(&v).to_os_string()));
            }
        }
        Ok(None)
    }

    fn set_redirect(&self, node: &Arc<Node>, redirect: &OsStr) -> Result<()> {
        let stack = node.dir_stack()?;
        sys::set_xattr(
            XattrTarget::Fd(stack.top().fd()?.as_fd()),
            self.format.redirect_xattr(),
            redirect.as_bytes(),
            0,
        )
        .sys("setxattr(redirect)")
        .map_err(|e| e.with_path(node.path()))
    }
}

/// A directory's upper copy moved to `name` in the directory `parent`.
fn relocate_upper_dir(node: &Node, parent: &DirStack, name: &OsStr) {
    if let Ok(stack) = node.dir_stack() {
        stack.layers[0]
            .lazy_fd()
            .relocate(parent.layers[0].clone(), name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: Side = Side {
        is_dir: false,
        merged: false,
        empty: false,
    };
    const UPPER_DIR: Side = Side {
        is_dir: true,
        merged: false,
        empty: true,
    };
    const MERGED_DIR: Side = Side {
        is_dir: true,
        merged: true,
        empty: true,
    };

    fn facts(src: Side, dst: Option<Side>) -> Facts {
        Facts {
            mode: RenameMode::Replace,
            src,
            dst,
            same_object: false,
            src_parent_merged: false,
            dst_parent_merged: false,
            src_name_in_lower: false,
            upper_target: UpperTarget::Nothing,
            moves_merged_dirs: true,
        }
    }

    fn steps(f: Facts) -> Vec<Step> {
        match plan(&f) {
            Plan::Steps(steps) => steps,
            other => panic!("expected steps, got {other:?}"),
        }
    }

    #[test]
    fn refusals_come_before_any_step() {
        let mut f = facts(FILE, Some(FILE));
        f.mode = RenameMode::NoReplace;
        assert_eq!(plan(&f), Plan::Refuse(Errno::EEXIST));
        let mut f = facts(FILE, None);
        f.mode = RenameMode::Exchange;
        assert_eq!(plan(&f), Plan::Refuse(Errno::ENOENT));
        assert_eq!(
            plan(&facts(UPPER_DIR, Some(FILE))),
            Plan::Refuse(Errno::ENOTDIR)
        );
        assert_eq!(
            plan(&facts(FILE, Some(UPPER_DIR))),
            Plan::Refuse(Errno::EISDIR)
        );
        let full = Side {
            empty: false,
            ..MERGED_DIR
        };
        assert_eq!(
            plan(&facts(UPPER_DIR, Some(full))),
            Plan::Refuse(Errno::ENOTEMPTY)
        );
        let mut f = facts(FILE, Some(FILE));
        f.same_object = true;
        assert_eq!(plan(&f), Plan::Nothing);
        f.mode = RenameMode::Exchange;
        assert!(matches!(plan(&f), Plan::Steps(_)), "exchange of links runs");
    }

    #[test]
    fn without_redirects_merged_directories_answer_exdev_before_enotempty() {
        let full = Side {
            empty: false,
            ..MERGED_DIR
        };
        let mut f = facts(MERGED_DIR, Some(full));
        f.moves_merged_dirs = false;
        assert_eq!(plan(&f), Plan::Refuse(Errno::EXDEV));
        let mut f = facts(MERGED_DIR, None);
        f.moves_merged_dirs = false;
        assert_eq!(plan(&f), Plan::Refuse(Errno::EXDEV));
        // An exchange moves the target too.
        let mut f = facts(UPPER_DIR, Some(MERGED_DIR));
        f.mode = RenameMode::Exchange;
        f.moves_merged_dirs = false;
        assert_eq!(plan(&f), Plan::Refuse(Errno::EXDEV));
        // Upper-only directories and files still move; a merged directory
        // may still be replaced.
        let mut f = facts(UPPER_DIR, Some(MERGED_DIR));
        f.moves_merged_dirs = false;
        assert!(matches!(plan(&f), Plan::Steps(_)));
        let mut f = facts(FILE, None);
        f.moves_merged_dirs = false;
        assert!(matches!(plan(&f), Plan::Steps(_)));
    }

    #[test]
    fn a_file_moves_in_one_rename_leaving_a_whiteout_where_a_lower_has_its_name() {
        let mut f = facts(FILE, Some(FILE));
        f.src_name_in_lower = true;
        f.upper_target = UpperTarget::NonDir;
        assert_eq!(
            steps(f),
            [Step::CopyUp(Which::Src), Step::Move { whiteout: true }]
        );
    }

    #[test]
    fn a_merged_directory_moves_with_a_redirect_and_is_never_made_opaque() {
        let mut f = facts(MERGED_DIR, None);
        f.dst_parent_merged = true;
        assert_eq!(
            steps(f),
            [
                Step::CopyUp(Which::Src),
                Step::SetRedirect(Which::Src),
                Step::Move { whiteout: false }
            ]
        );
    }

    #[test]
    fn an_upper_directory_moving_into_a_merged_parent_is_made_opaque_first() {
        let mut f = facts(UPPER_DIR, None);
        f.dst_parent_merged = true;
        assert_eq!(
            steps(f),
            [
                Step::CopyUp(Which::Src),
                Step::MarkOpaque(Which::Src),
                Step::Move { whiteout: false }
            ]
        );
    }

    /// The crash-safety cases: no plan ever moves the target away first.
    #[test]
    fn a_directory_onto_a_whiteout_is_one_exchange() {
        let mut f = facts(UPPER_DIR, None);
        f.upper_target = UpperTarget::NonDir;
        assert_eq!(
            steps(f),
            [
                Step::CopyUp(Which::Src),
                Step::ExchangeWithWhiteout {
                    keep_whiteout: false
                }
            ]
        );
        f.src_name_in_lower = true;
        assert_eq!(
            steps(f).last(),
            Some(&Step::ExchangeWithWhiteout {
                keep_whiteout: true
            })
        );
    }

    #[test]
    fn a_directory_onto_an_empty_merged_one_clears_it_in_place_then_replaces_it() {
        let mut f = facts(UPPER_DIR, Some(MERGED_DIR));
        f.upper_target = UpperTarget::DirWithWhiteouts;
        f.dst_parent_merged = true;
        assert_eq!(
            steps(f),
            [
                Step::CopyUp(Which::Src),
                Step::MarkOpaque(Which::Src),
                Step::ClearTarget,
                Step::Move { whiteout: false }
            ]
        );
        f.upper_target = UpperTarget::EmptyDir;
        assert_eq!(steps(f).last(), Some(&Step::Move { whiteout: false }));
        assert!(!steps(f).contains(&Step::ClearTarget));
    }

    #[test]
    fn an_exchange_copies_up_and_marks_both_sides() {
        let mut f = facts(UPPER_DIR, Some(MERGED_DIR));
        f.mode = RenameMode::Exchange;
        f.dst_parent_merged = true;
        f.src_parent_merged = true;
        assert_eq!(
            steps(f),
            [
                Step::CopyUp(Which::Src),
                Step::CopyUp(Which::Dst),
                Step::SetRedirect(Which::Dst),
                Step::MarkOpaque(Which::Src),
                Step::Exchange
            ]
        );
    }
}
