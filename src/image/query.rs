//! Finding images by reference, and the read-only commands: `image ls`,
//! `image inspect`, `image history`.

use serde_json::{Value, json};

use super::digest::Digest;
use super::output::{human_size, print_json, print_table, short_time};
use super::store::{ImageRecord, Index, Store};
use super::{Context, Result};

/// Finds an image by `NAME:TAG`, `NAME` (tag `latest`), a full ID
/// (`sha256:` optional) or a unique ID prefix of at least 4 hex digits.
/// Names match as given, and also with podman's `localhost/` in front.
pub fn resolve(index: &Index, reference: &str) -> Result<Digest> {
    if let Ok(id) = Digest::parse(reference)
        && index.images.contains_key(&id)
    {
        return Ok(id);
    }
    let tagged = with_default_tag(reference);
    for candidate in [tagged.clone(), format!("localhost/{tagged}")] {
        if let Some((id, _)) = index
            .images
            .iter()
            .find(|(_, image)| image.repo_tags.contains(&candidate))
        {
            return Ok(id.clone());
        }
    }
    let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
    if prefix.len() >= 4 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        let prefix = prefix.to_ascii_lowercase();
        let matches: Vec<&Digest> = index
            .images
            .keys()
            .filter(|id| id.hex().starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            _ => return Err(format!("'{reference}' matches more than one image ID")),
        }
    }
    Err(format!("no such image: {reference}"))
}

/// `NAME` -> `NAME:latest`; a `:` after the last `/` is a tag already (one
/// before it is a registry port).
pub fn with_default_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') || reference.contains('@') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    }
}

fn config_json(store: &Store, id: &Digest) -> Result<Value> {
    serde_json::from_slice(&store.read_config(id)?).ctx(|| format!("config of image {id}"))
}

fn created(config: &Value) -> String {
    config["created"].as_str().unwrap_or_default().to_string()
}

pub fn ls(store: &Store, json: bool) -> Result<()> {
    let index = {
        let lock = store.lock_shared()?;
        store.read_index(&lock)?
    };
    let mut images: Vec<(&Digest, &ImageRecord, String)> = Vec::new();
    for (id, image) in &index.images {
        images.push((id, image, created(&config_json(store, id)?)));
    }
    // Newest first, as docker lists them.
    images.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    if json {
        let list: Vec<Value> = images
            .iter()
            .map(|(id, image, created)| {
                json!({
                    "Id": id.to_string(),
                    "RepoTags": image.repo_tags,
                    "Created": created,
                    "Size": index.image_size(image),
                    "Layers": image.layers.len(),
                })
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    let mut rows = Vec::new();
    for (id, image, created) in &images {
        let names = if image.repo_tags.is_empty() {
            vec!["<none>:<none>".to_string()]
        } else {
            image.repo_tags.clone()
        };
        for name in names {
            rows.push(vec![
                name,
                id.short().to_string(),
                short_time(created),
                human_size(index.image_size(image)),
            ]);
        }
    }
    print_table(&["NAME:TAG", "IMAGE ID", "CREATED", "SIZE"], &rows);
    Ok(())
}

pub fn inspect(store: &Store, reference: &str) -> Result<()> {
    let (index, id) = {
        let lock = store.lock_shared()?;
        let index = store.read_index(&lock)?;
        let id = resolve(&index, reference)?;
        (index, id)
    };
    let image = &index.images[&id];
    let config = config_json(store, &id)?;
    let out = json!([{
        "Id": id.to_string(),
        "RepoTags": image.repo_tags,
        "Created": config["created"],
        "Author": config["author"],
        "Architecture": config["architecture"],
        "Os": config["os"],
        "Config": config["config"],
        "RootFS": {
            "Type": "layers",
            "Layers": image.layers.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        },
        "Size": index.image_size(image),
        "LayerDirs": image.layers.iter().rev().map(|d| store.layer_dir(d).display().to_string()).collect::<Vec<_>>(),
    }]);
    print_json(&out);
    Ok(())
}

/// One row of `image history`.
struct HistoryRow {
    created: String,
    created_by: String,
    comment: String,
    empty_layer: bool,
    diff_id: Option<Digest>,
    size: u64,
}

/// Pairs the config's history with the layers: each entry without
/// `empty_layer` made the next layer; configs without history get one
/// anonymous row per layer. Newest first, like `docker image history`.
fn history_rows(config: &Value, image: &ImageRecord, index: &Index) -> Vec<HistoryRow> {
    let mut layers = image.layers.iter();
    let mut rows = Vec::new();
    let size = |d: &Digest| index.layers.get(d).map_or(0, |l| l.size);
    if let Some(history) = config["history"].as_array() {
        for entry in history {
            let empty_layer = entry["empty_layer"].as_bool().unwrap_or(false);
            let diff_id = if empty_layer {
                None
            } else {
                layers.next().cloned()
            };
            rows.push(HistoryRow {
                created: entry["created"].as_str().unwrap_or_default().into(),
                created_by: entry["created_by"].as_str().unwrap_or_default().into(),
                comment: entry["comment"].as_str().unwrap_or_default().into(),
                empty_layer,
                size: diff_id.as_ref().map_or(0, size),
                diff_id,
            });
        }
    }
    // Layers the history does not account for (a config without history).
    for diff_id in layers {
        rows.push(HistoryRow {
            created: String::new(),
            created_by: String::new(),
            comment: String::new(),
            empty_layer: false,
            size: size(diff_id),
            diff_id: Some(diff_id.clone()),
        });
    }
    rows.reverse();
    rows
}

pub fn history(store: &Store, reference: &str, json: bool) -> Result<()> {
    let (index, id) = {
        let lock = store.lock_shared()?;
        let index = store.read_index(&lock)?;
        let id = resolve(&index, reference)?;
        (index, id)
    };
    let image = &index.images[&id];
    let rows = history_rows(&config_json(store, &id)?, image, &index);
    if json {
        let list: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "Created": r.created,
                    "CreatedBy": r.created_by,
                    "Comment": r.comment,
                    "EmptyLayer": r.empty_layer,
                    "DiffId": r.diff_id.as_ref().map(|d| d.to_string()),
                    "Size": r.size,
                })
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                // docker shows the image's ID on the top row only.
                if i == 0 {
                    id.short().to_string()
                } else {
                    "<missing>".into()
                },
                short_time(&r.created),
                r.created_by.replace('\n', " "),
                human_size(r.size),
                r.diff_id
                    .as_ref()
                    .map_or("-".into(), |d| d.short().to_string()),
                r.comment.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "IMAGE",
            "CREATED",
            "CREATED BY",
            "SIZE",
            "DIFF ID",
            "COMMENT",
        ],
        &table,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_with(id: &Digest, tags: &[&str]) -> Index {
        let mut index = Index::default();
        index.images.insert(
            id.clone(),
            ImageRecord {
                repo_tags: tags.iter().map(|t| t.to_string()).collect(),
                layers: vec![],
                loaded: 0,
            },
        );
        index
    }

    #[test]
    fn references_resolve() {
        let id = Digest::of(b"x");
        let index = index_with(&id, &["localhost/app:1", "busy:latest"]);
        assert_eq!(resolve(&index, "busy").unwrap(), id);
        assert_eq!(resolve(&index, "app:1").unwrap(), id);
        assert_eq!(resolve(&index, &id.hex()[..4]).unwrap(), id);
        assert_eq!(resolve(&index, &id.to_string()).unwrap(), id);
        assert!(resolve(&index, &id.hex()[..3]).is_err());
        assert!(resolve(&index, "app").is_err());
        assert_eq!(with_default_tag("reg:5000/a"), "reg:5000/a:latest");
    }
}
