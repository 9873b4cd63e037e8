//! Images for the process runtime: `host` (the node's own filesystem), a
//! directory (used as is, read-only), or a tarball in `docker save` or OCI
//! layout format, unpacked once into the image cache.

use super::{rootfs::DEFAULT_PATH, state::RootfsSource};
use crate::runtime::ImageConfig;
use std::{
    collections::HashMap,
    fs::{self, File},
    io::{BufReader, Read, Seek, SeekFrom},
    path::{Component, Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

/// The defaults of `host` and directory images: only a PATH, which
/// Docker images carry too (the container gets exactly its env).
fn plain_config() -> ImageConfig {
    ImageConfig {
        env: vec![("PATH".into(), DEFAULT_PATH.into())],
        ..ImageConfig::default()
    }
}

/// An image ready to use.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedImage {
    /// `sha256:…`
    pub id: String,
    pub source: RootfsSource,
    pub config: ImageConfig,
}

/// Remembers tarball digests by (path, size, mtime) so a start does not
/// hash the tarball again.
pub(crate) type DigestMemo = Mutex<HashMap<(PathBuf, u64, SystemTime), String>>;

const IMAGE_CONFIG_FILE: &str = "config.json";

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Resolves (and for a tarball, unpacks into `cache` once) an image.
pub(crate) fn resolve(
    image: &str,
    cache: &Path,
    memo: &DigestMemo,
) -> Result<ResolvedImage, String> {
    if image == "host" {
        return Ok(ResolvedImage {
            id: format!("sha256:{}", sha256_hex(b"host")),
            source: RootfsSource::Host,
            config: plain_config(),
        });
    }
    if !image.starts_with('/') {
        return Err(
            "the process runtime runs `host`, an absolute directory path or an absolute image tarball path"
                .into(),
        );
    }
    let path = Path::new(image);
    let meta = fs::metadata(path).map_err(|e| format!("{image}: {e}"))?;
    if meta.is_dir() {
        return Ok(ResolvedImage {
            id: format!("sha256:{}", sha256_hex(image.as_bytes())),
            source: RootfsSource::Overlay {
                lower: path.to_path_buf(),
            },
            config: plain_config(),
        });
    }
    let key = (
        path.to_path_buf(),
        meta.len(),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    );
    let known = memo.lock().ok().and_then(|m| m.get(&key).cloned());
    let digest = match known {
        Some(d) => d,
        None => {
            let d = file_sha256(path).map_err(|e| format!("reading {image}: {e}"))?;
            if let Ok(mut m) = memo.lock() {
                m.insert(key, d.clone());
            }
            d
        }
    };
    let dir = cache.join(&digest);
    if !dir.join(IMAGE_CONFIG_FILE).exists() {
        unpack(path, cache, &digest)?;
    }
    let config = fs::read(dir.join(IMAGE_CONFIG_FILE))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_else(plain_config);
    Ok(ResolvedImage {
        id: format!("sha256:{digest}"),
        source: RootfsSource::Overlay {
            lower: dir.join("rootfs"),
        },
        config,
    })
}

/// A reader over a file that may be gzip-compressed.
fn open_maybe_gzip(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    f.seek(SeekFrom::Start(0))?;
    let reader = BufReader::new(f);
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Unpacks into a temporary directory and renames it into place, so a
/// crash never leaves a half-unpacked image in the cache.
fn unpack(tarball: &Path, cache: &Path, digest: &str) -> Result<(), String> {
    fs::create_dir_all(cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = cache.join(format!(".tmp-{digest}-{}-{nanos}", std::process::id()));
    let result = unpack_into(tarball, &tmp);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let final_dir = cache.join(digest);
    if let Err(e) = fs::rename(&tmp, &final_dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Someone else unpacked the same image meanwhile: fine.
        if !final_dir.join(IMAGE_CONFIG_FILE).exists() {
            return Err(format!(
                "moving the unpacked image into {}: {e}",
                final_dir.display()
            ));
        }
    }
    Ok(())
}

fn unpack_into(tarball: &Path, tmp: &Path) -> Result<(), String> {
    let src = tmp.join("src");
    let rootfs = tmp.join("rootfs");
    for d in [&src, &rootfs] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let reader = open_maybe_gzip(tarball).map_err(|e| format!("opening: {e}"))?;
    tar::Archive::new(reader)
        .unpack(&src)
        .map_err(|e| format!("not a readable tar archive: {e}"))?;
    let (layers, config) = read_manifest(&src)?;
    for layer in &layers {
        apply_layer(layer, &rootfs).map_err(|e| {
            format!(
                "layer {}: {e}",
                layer.strip_prefix(&src).unwrap_or(layer).display()
            )
        })?;
    }
    let config_json = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    fs::write(tmp.join(IMAGE_CONFIG_FILE), config_json)
        .map_err(|e| format!("writing the image config: {e}"))?;
    fs::remove_dir_all(&src).map_err(|e| format!("cleaning up: {e}"))
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let data = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))
}

/// A file named inside the archive, refusing paths that leave it.
fn inside(src: &Path, name: &str) -> Result<PathBuf, String> {
    let rel = Path::new(name);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("bad path {name:?} in the image manifest"));
    }
    Ok(src.join(rel))
}

fn blob(src: &Path, digest: &str) -> Result<PathBuf, String> {
    let (alg, hexpart) = digest
        .split_once(':')
        .ok_or_else(|| format!("bad digest {digest:?}"))?;
    inside(src, &format!("blobs/{alg}/{hexpart}"))
}

/// The layer files in order and the image config.
fn read_manifest(src: &Path) -> Result<(Vec<PathBuf>, ImageConfig), String> {
    let manifest = src.join("manifest.json");
    if manifest.exists() {
        let m = read_json(&manifest)?;
        let entry = m.get(0).ok_or("manifest.json lists no image")?;
        let layers = entry
            .get("Layers")
            .and_then(|l| l.as_array())
            .ok_or("manifest.json has no Layers")?
            .iter()
            .map(|l| inside(src, l.as_str().unwrap_or_default()))
            .collect::<Result<Vec<_>, _>>()?;
        let config = match entry.get("Config").and_then(|c| c.as_str()) {
            Some(c) => parse_config(&read_json(&inside(src, c)?)?),
            None => ImageConfig::default(),
        };
        return Ok((layers, config));
    }
    let index = src.join("index.json");
    if !index.exists() {
        return Err(
            "not a docker-save or OCI image archive (no manifest.json or index.json)".into(),
        );
    }
    let mut doc = read_json(&index)?;
    // Follow nested indexes (multi-platform images) to a manifest.
    for _ in 0..4 {
        let Some(manifests) = doc.get("manifests").and_then(|m| m.as_array()) else {
            break;
        };
        let pick = manifests
            .iter()
            .find(|m| m.pointer("/platform/architecture").and_then(|a| a.as_str()) == Some("amd64"))
            .or_else(|| manifests.first())
            .ok_or("index.json lists no manifest")?;
        let digest = pick
            .get("digest")
            .and_then(|d| d.as_str())
            .ok_or("index entry without digest")?;
        doc = read_json(&blob(src, digest)?)?;
    }
    let layers = doc
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or("OCI manifest has no layers")?
        .iter()
        .map(|l| {
            blob(
                src,
                l.get("digest").and_then(|d| d.as_str()).unwrap_or_default(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = match doc.pointer("/config/digest").and_then(|d| d.as_str()) {
        Some(d) => parse_config(&read_json(&blob(src, d)?)?),
        None => ImageConfig::default(),
    };
    Ok((layers, config))
}

fn strings(v: Option<&serde_json::Value>) -> Vec<String> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_config(doc: &serde_json::Value) -> ImageConfig {
    let c = doc.get("config").or_else(|| doc.get("Config"));
    let c = c.unwrap_or(&serde_json::Value::Null);
    ImageConfig {
        entrypoint: strings(c.get("Entrypoint")),
        cmd: strings(c.get("Cmd")),
        env: strings(c.get("Env"))
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
        working_dir: c
            .get("WorkingDir")
            .and_then(|w| w.as_str())
            .filter(|w| !w.is_empty())
            .map(str::to_owned),
    }
}

/// Normalised relative path of a layer entry (None for the root itself).
fn entry_path(raw: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(format!("entry {} leaves the layer", raw.display())),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// The parent directory of `rel` in the rootfs, only if it really is
/// inside (a symlink in a lower layer must not redirect a whiteout onto
/// the host).
fn parent_inside(rootfs: &Path, rel: &Path) -> Option<PathBuf> {
    let parent = rootfs.join(rel.parent()?);
    let real = fs::canonicalize(&parent).ok()?;
    let root = fs::canonicalize(rootfs).ok()?;
    real.starts_with(&root).then_some(real)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one layer: first its whiteouts (which only hide what lower
/// layers made), then its files.
fn apply_layer(layer: &Path, rootfs: &Path) -> Result<(), String> {
    let open = || -> Result<tar::Archive<Box<dyn Read>>, String> {
        let mut a = tar::Archive::new(open_maybe_gzip(layer).map_err(|e| e.to_string())?);
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        a.set_preserve_mtime(true);
        a.set_overwrite(true);
        a.set_unpack_xattrs(false);
        Ok(a)
    };
    let mut archive = open()?;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(rel) = entry_path(&raw)? else {
            continue;
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hidden) = name.strip_prefix(".wh.") else {
            continue;
        };
        let Some(parent) = parent_inside(rootfs, &rel) else {
            continue;
        };
        if hidden == ".wh..opq" {
            // Opaque directory: nothing from lower layers shows through.
            if let Ok(children) = fs::read_dir(&parent) {
                for child in children.flatten() {
                    remove_any(&child.path()).map_err(|e| e.to_string())?;
                }
            }
        } else {
            remove_any(&parent.join(hidden)).map_err(|e| e.to_string())?;
        }
    }
    let mut archive = open()?;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(rel) = entry_path(&raw)? else {
            continue;
        };
        if rel
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        // A directory replaced by a file (or the reverse) must go first.
        let target = rootfs.join(&rel);
        if let Ok(existing) = fs::symlink_metadata(&target) {
            let new_is_dir = entry.header().entry_type().is_dir();
            if existing.is_dir() != new_is_dir {
                remove_any(&target).map_err(|e| e.to_string())?;
            }
        }
        entry
            .unpack_in(rootfs)
            .map_err(|e| format!("{}: {e}", rel.display()))?;
    }
    Ok(())
}
