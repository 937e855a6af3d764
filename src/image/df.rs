//! `unionfs system df [-v]`: what the store holds and what removing
//! images would give back, as `docker system df` reports it. Sizes are
//! layer content sizes; a layer shared by several images counts once.
//! Containers count by the bytes in their uppers; their images' layers are
//! active (not reclaimable) while they exist.
//! The layers' original tars (kept for `image save`) are a row of their
//! own: they take about as much space again.
//! `--format json` gives the same numbers in bytes: an array of the
//! summary rows, or with `-v` an object of the summary and the
//! per-image, per-layer and per-container lists.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Result;
use super::container::{image_name, is_mounted, upper_sizes};
use super::digest::Digest;
use super::output::{human_size, print_json, print_table};
use super::remove::layers_in_use_by_containers;
use super::store::Store;

/// One summary row: what is stored, what is in use, what could go.
struct Usage {
    kind: &'static str,
    total: usize,
    active: usize,
    size: u64,
    reclaimable: u64,
}

impl Usage {
    fn percent(&self) -> u64 {
        (self.reclaimable * 100).checked_div(self.size).unwrap_or(0)
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.kind.into(),
            self.total.to_string(),
            self.active.to_string(),
            human_size(self.size),
            format!("{} ({}%)", human_size(self.reclaimable), self.percent()),
        ]
    }

    fn json(&self) -> Value {
        json!({
            "Type": self.kind,
            "TotalCount": self.total,
            "Active": self.active,
            "Size": self.size,
            "Reclaimable": self.reclaimable,
            "ReclaimablePercent": self.percent(),
        })
    }
}

pub fn df(store: &Store, verbose: bool, json_format: bool) -> Result<()> {
    let index = {
        let lock = store.lock_shared()?;
        store.read_index(&lock)?
    };
    let in_use = layers_in_use_by_containers(store, &index);
    // How many images use each layer.
    let mut users: BTreeMap<&Digest, usize> = BTreeMap::new();
    for image in index.images.values() {
        let mut seen = std::collections::BTreeSet::new();
        for layer in &image.layers {
            if seen.insert(layer) {
                *users.entry(layer).or_default() += 1;
            }
        }
    }
    let size_of = |d: &Digest| index.layers.get(d).map_or(0, |l| l.size);
    let total: u64 = index.layers.values().map(|l| l.size).sum();
    let used_images = index.images_in_use();
    let active_images = used_images.len();
    let containers = upper_sizes(store, &index);
    let containers_total: u64 = containers.iter().map(|(_, size)| size).sum();
    let containers_mounted = index.containers.values().filter(|c| is_mounted(c)).count();
    // A mounted container's upper is in use; an unmounted one's is what
    // `container rm` would give back.
    let containers_reclaimable: u64 = containers
        .iter()
        .filter(|(name, _)| !index.containers.get(name).is_some_and(is_mounted))
        .map(|(_, size)| size)
        .sum();
    let reclaimable: u64 = index
        .layers
        .iter()
        .filter(|(d, _)| !in_use.contains(*d))
        .map(|(_, l)| l.size)
        .sum();
    let tar_of = |d: &Digest| index.layers.get(d).and_then(|l| l.tar_size).unwrap_or(0);
    let tars = index.tar_bytes();
    let tar_count = index
        .layers
        .values()
        .filter(|l| l.tar_size.is_some())
        .count();
    let tars_reclaimable: u64 = index
        .layers
        .keys()
        .filter(|d| !in_use.contains(*d))
        .map(tar_of)
        .sum();
    let summary = [
        Usage {
            kind: "Images",
            total: index.images.len(),
            active: active_images,
            size: total,
            reclaimable,
        },
        Usage {
            kind: "Layers",
            total: index.layers.len(),
            active: in_use.len(),
            size: total,
            reclaimable,
        },
        Usage {
            kind: "Layer tars",
            total: tar_count,
            active: in_use.iter().filter(|d| tar_of(d) > 0).count(),
            size: tars,
            reclaimable: tars_reclaimable,
        },
        Usage {
            kind: "Containers",
            total: index.containers.len(),
            active: containers_mounted,
            size: containers_total,
            reclaimable: containers_reclaimable,
        },
    ];
    let summary_json = Value::Array(summary.iter().map(Usage::json).collect());
    if json_format && !verbose {
        print_json(&summary_json);
        return Ok(());
    }
    if !json_format {
        print_table(
            &["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
            &summary.iter().map(Usage::row).collect::<Vec<_>>(),
        );
    }
    if !verbose {
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut images_json = Vec::new();
    for (id, image) in &index.images {
        let mut shared = 0;
        let mut unique = 0;
        let mut seen = std::collections::BTreeSet::new();
        for layer in image.layers.iter().filter(|l| seen.insert(*l)) {
            if users.get(layer).copied().unwrap_or(0) > 1 {
                shared += size_of(layer);
            } else {
                unique += size_of(layer);
            }
        }
        let name = image
            .repo_tags
            .first()
            .cloned()
            .unwrap_or_else(|| "<none>:<none>".into());
        let containers_of = used_images.get(id).map_or(0, Vec::len);
        images_json.push(json!({
            "Name": name,
            "Id": id.to_string(),
            "Size": shared + unique,
            "SharedSize": shared,
            "UniqueSize": unique,
            "Containers": containers_of,
        }));
        rows.push(vec![
            name,
            id.short().to_string(),
            human_size(shared + unique),
            human_size(shared),
            human_size(unique),
            containers_of.to_string(),
        ]);
    }
    let layers_json: Vec<Value> = index
        .layers
        .iter()
        .map(|(d, l)| {
            json!({
                "Id": d.to_string(),
                "Size": l.size,
                "TarSize": l.tar_size,
                "Images": users.get(d).copied().unwrap_or(0),
            })
        })
        .collect();
    let containers_json: Vec<Value> = containers
        .iter()
        .map(|(name, size)| {
            let record = &index.containers[name];
            json!({
                "Name": name,
                "Image": image_name(&index, record),
                "Size": size,
                "Mounted": is_mounted(record),
            })
        })
        .collect();
    if json_format {
        print_json(&json!({
            "Summary": summary_json,
            "Images": images_json,
            "Layers": layers_json,
            "Containers": containers_json,
        }));
        return Ok(());
    }
    println!("\nImages space usage:\n");
    print_table(
        &[
            "NAME:TAG",
            "IMAGE ID",
            "SIZE",
            "SHARED SIZE",
            "UNIQUE SIZE",
            "CONTAINERS",
        ],
        &rows,
    );
    println!("\nLayers space usage:\n");
    let rows: Vec<Vec<String>> = index
        .layers
        .iter()
        .map(|(d, l)| {
            vec![
                d.short().to_string(),
                human_size(l.size),
                l.tar_size.map_or("-".into(), human_size),
                users.get(d).copied().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    print_table(&["LAYER", "SIZE", "TAR SIZE", "IMAGES"], &rows);
    println!("\nContainers space usage:\n");
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|(name, size)| {
            let record = &index.containers[name];
            vec![
                name.clone(),
                image_name(&index, record),
                human_size(*size),
                if is_mounted(record) {
                    "mounted".into()
                } else {
                    "unmounted".into()
                },
            ]
        })
        .collect();
    print_table(&["CONTAINER", "IMAGE", "SIZE", "STATUS"], &rows);
    Ok(())
}
