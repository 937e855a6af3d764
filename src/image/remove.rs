//! `unionfs image rm`: untag, or delete an image and the layers nothing
//! uses any more.

use std::collections::BTreeSet;
use std::fs;

use super::digest::Digest;
use super::query::{resolve, with_default_tag};
use super::store::{Index, Store, remove_tree};
use super::{Context, Result};

/// Layers that containers use, which no `image rm` may delete: a
/// container's lowers stay while it exists. `system df` counts them as
/// active through it too.
pub fn layers_in_use_by_containers(_store: &Store, index: &Index) -> BTreeSet<Digest> {
    index
        .containers
        .values()
        .flat_map(|c| c.layers.iter().cloned())
        .collect()
}

pub fn rm(store: &Store, reference: &str) -> Result<()> {
    let lock = store.lock_exclusive()?;
    let mut index = store.read_index(&lock)?;
    let id = resolve(&index, reference)?;
    let image = index.images.get_mut(&id).expect("resolved");
    // `rm NAME:TAG` of an image with other tags only removes that tag, as
    // `docker rmi` does.
    let tag = [
        with_default_tag(reference),
        format!("localhost/{}", with_default_tag(reference)),
    ]
    .into_iter()
    .find(|t| image.repo_tags.contains(t));
    if let Some(tag) = &tag
        && image.repo_tags.len() > 1
    {
        image.repo_tags.retain(|t| t != tag);
        store.write_index(&lock, &index)?;
        println!("Untagged: {tag}");
        return Ok(());
    }
    if let Some(users) = index.images_in_use().get(&id) {
        return Err(format!(
            "image {} is in use by container{} {}: remove {} first (unionfs container rm NAME)",
            tag.as_deref().unwrap_or(reference),
            if users.len() > 1 { "s" } else { "" },
            users.join(", "),
            if users.len() > 1 { "them" } else { "it" },
        ));
    }
    let removed = index.images.remove(&id).expect("resolved");
    let mut keep = index.referenced_layers();
    keep.extend(layers_in_use_by_containers(store, &index));
    let orphaned: Vec<Digest> = removed
        .layers
        .iter()
        .filter(|d| !keep.contains(*d))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for diff_id in &orphaned {
        index.layers.remove(diff_id);
    }
    // The index first: a crash after it leaves unreferenced layers, which
    // the next command collects, never an image without its layers.
    store.write_index(&lock, &index)?;
    let _ = fs::remove_file(store.config_path(&id));
    for diff_id in &orphaned {
        let dir = store.layer_dir(diff_id);
        remove_tree(&dir).ctx(|| format!("remove {}", dir.display()))?;
        let tar = store.layer_tar(diff_id);
        match fs::remove_file(&tar) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {}: {e}", tar.display()));
            }
            _ => {}
        }
    }
    for tag in &removed.repo_tags {
        println!("Untagged: {tag}");
    }
    println!("Deleted: {id}");
    for diff_id in &orphaned {
        println!("Deleted layer: {diff_id}");
    }
    Ok(())
}
