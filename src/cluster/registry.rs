//! Which shards this service follows, on disk: `[buffer] path/shards/<id>.members`, one node
//! id per line, beside the shard's buffer `[buffer] path/shards/<id>/`.
//!
//! A shard's id is the node id of its primary when the service first saw it; the members file
//! lists every node id seen in the shard since, so that the shard is recognised after failovers
//! and node replacements (`locator.rs`), also across restarts. The file is replaced whole
//! (written aside, synced, renamed), so a crash leaves the old list or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A shard remembered on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownShard {
    pub id: String,
    pub members: Vec<String>,
}

/// The directory holding every shard's buffer and members file.
pub fn shards_dir(buffer: &Path) -> PathBuf {
    buffer.join("shards")
}

/// Every shard remembered under `dir`, by id.
pub fn load(dir: &Path) -> std::io::Result<Vec<KnownShard>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut shards = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("members") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let members: Vec<String> = std::fs::read_to_string(&path)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        shards.push(KnownShard {
            id: id.to_string(),
            members,
        });
    }
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(shards)
}

/// Records `shard` (replacing its list).
pub fn save(dir: &Path, shard: &KnownShard) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}.members", shard.id));
    let aside = dir.join(format!("{}.members.new", shard.id));
    let mut file = std::fs::File::create(&aside)?;
    for member in &shard.members {
        writeln!(file, "{member}")?;
    }
    file.sync_all()?;
    std::fs::rename(&aside, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Marks shard `id` retired: its members file becomes `<id>.retired` (not started again; its
/// buffer stays for inspection).
pub fn retire(dir: &Path, id: &str) -> std::io::Result<()> {
    let path = dir.join(format!("{id}.members"));
    match std::fs::rename(&path, dir.join(format!("{id}.retired"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::File::open(dir)?.sync_all(),
    }
}

/// Whether `id` can name a shard's files: a node id is 40 hexadecimal characters.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_and_other_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&dir.path().join("absent")).unwrap(), vec![]);
        let shard = KnownShard {
            id: "abc".into(),
            members: vec!["abc".into(), "def".into()],
        };
        save(dir.path(), &shard).unwrap();
        std::fs::create_dir(dir.path().join("abc")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![shard.clone()]);
        let grown = KnownShard {
            members: vec!["abc".into(), "def".into(), "ghi".into()],
            ..shard
        };
        save(dir.path(), &grown).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![grown]);
        assert!(is_valid_id("e10b7051d6bf2d5febd39a2be297bbaea6084111"));
        assert!(!is_valid_id("../x") && !is_valid_id(""));
    }
}
