//! Where the Kubernetes binaries come from: `hack/kube-bins` builds them once into a cache outside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The directory holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok.
#[derive(Debug, Clone)]
pub struct KubeBins {
    dir: PathBuf,
}

impl KubeBins {
    /// `$BERTH_KUBE_BINS` if set, else whatever `hack/kube-bins` prints last (it builds on a cold cache).
    pub fn locate() -> Result<KubeBins> {
        static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let dir = DIR.get_or_init(|| locate_dir().map_err(|e| format!("{e:#}")));
        match dir {
            Ok(dir) => Ok(KubeBins { dir: dir.clone() }),
            Err(e) => bail!("{e}"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A binary of this workspace, built (debug profile) on first use. Tests of one package use this for another
/// package's binary, which cargo does not build for them.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    workspace_binary_with_features(package, bin, &[])
}

/// [`workspace_binary`] built with the package's `features` (for a binary that requires them, such as
/// `berth-controller-failpoints`; cargo keeps each feature set's build apart).
pub fn workspace_binary_with_features(package: &str, bin: &str, features: &[&str]) -> Result<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let path = target_dir().join("debug").join(bin);
    if !built.iter().any(|b| b == bin) {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut args = vec!["build", "--quiet", "-p", package, "--bin", bin];
        let features = features.join(",");
        if !features.is_empty() {
            args.extend(["--features", &features]);
        }
        let status = Command::new(cargo)
            .args(&args)
            .current_dir(repo_root())
            .status()
            .with_context(|| format!("building {bin}"))?;
        if !status.success() {
            bail!("cargo build -p {package} --bin {bin} failed");
        }
        built.push(bin.to_owned());
    }
    Ok(path)
}

/// Where cargo puts this workspace's builds: CARGO_TARGET_DIR when set (relative to the workspace, as cargo reads
/// it there), else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), |t| repo_root().join(t))
}

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `$env` if set, else the last line `script args` prints (hack/kube-bins, hack/node-bins and hack/build-image
/// print their output directory last, building it first on a cold cache).
pub(crate) fn dir_from_env_or_script(env: &str, script: &str, args: &[&str]) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(env) {
        return Ok(PathBuf::from(dir));
    }
    let path = repo_root().join(script);
    let out = Command::new(&path)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", path.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}); see its output above", path.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(stdout.lines().last().with_context(|| format!("{script} printed nothing"))?.trim()))
}

fn locate_dir() -> Result<PathBuf> {
    let dir = dir_from_env_or_script("BERTH_KUBE_BINS", "hack/kube-bins", &[])?;
    for bin in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"] {
        if !dir.join(bin).is_file() {
            bail!("{} has no {bin}: run hack/kube-bins, or point BERTH_KUBE_BINS at its output", dir.display());
        }
    }
    Ok(dir)
}

/// The helm binary the chart's tests run: `$BERTH_HELM` if set, else what `hack/helm` prints last (it builds Helm
/// on a cold cache).
pub fn helm() -> Result<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let path = dir_from_env_or_script("BERTH_HELM", "hack/helm", &[]).map_err(|e| format!("{e:#}"))?;
        if path.is_file() { Ok(path) } else { Err(format!("{} is not a file: run hack/helm", path.display())) }
    });
    match path {
        Ok(path) => Ok(path.clone()),
        Err(e) => bail!("{e}"),
    }
}
