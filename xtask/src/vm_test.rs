//! `cargo xtask vm-test`: boots Debian's Linux 5.10 cloud kernel under qemu
//! and runs every test binary of the dataplane crate inside it, so each eBPF
//! program is loaded (and verified) by a 5.10 kernel.
//!
//! Steps, all cached under `target/vm/`:
//! 1. the kernel package (downloaded with a private apt configuration for
//!    bullseye, sha256-checked; `../shared/kernels/` is the fallback), its
//!    vmlinuz and the modules the tests need (plus their dependencies);
//! 2. the dataplane's test binaries, linked statically (`+crt-static`) in
//!    their own target directory (`target/vm-build`) with the eBPF object
//!    embedded;
//! 3. an initramfs (cpio newc, gzip): busybox-static, iproute2's `ip` with
//!    its libraries, the modules, the test binaries, a static helper that
//!    writes the verdict to qemu's isa-debug-exit port, and a generated
//!    `/init`;
//! 4. qemu (`-nic none`: the guest has no network beyond its own
//!    namespaces), wrapped in `timeout`; the console streams to the terminal
//!    and to `target/vm/console.log`; the verdict is qemu's exit status.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail};
use object::{Object, ObjectSection};

use crate::{
    ebpf,
    test::TestEnv,
    util::{self, Cmd},
};

/// The kernel package: Debian bullseye's last 5.10 cloud kernel.
const KERNEL_PACKAGE: &str = "linux-image-5.10.0-32-cloud-amd64";
const KERNEL_VERSION: &str = "5.10.223-1";
/// `uname -r` of that kernel (its /lib/modules directory).
const KERNEL_RELEASE: &str = "5.10.0-32-cloud-amd64";
const KERNEL_DEB: &str = "linux-image-5.10.0-32-cloud-amd64_5.10.223-1_amd64.deb";
/// From ../shared/kernels/SHA256SUMS; hard-coded because that directory is
/// not beside every clone.
const KERNEL_SHA256: &str = "fb4a1229952d892138532c1d9f40a7fd0bd408e4dcf969c12e4524b6a89fdcb8";

/// Kernel modules the dataplane tests need that the cloud kernel does not
/// build in (their dependencies, read from each module's .modinfo, are
/// added and loaded first).
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf", "act_bpf"];

/// The crate whose test binaries run in the guest.
const TEST_PACKAGE: &str = "skep-dataplane";
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Codes the guest writes to the isa-debug-exit port; qemu then exits with
/// `(code << 1) | 1`. Distinct from 0/1 so a qemu error is never mistaken
/// for a verdict.
const EXIT_PASS: u8 = 0x21;
const EXIT_TESTS_FAILED: u8 = 0x22;
const EXIT_SETUP_FAILED: u8 = 0x23;

/// Default bound on one boot, tests included.
pub const DEFAULT_TIMEOUT_SECS: u64 = 900;

/// Marker lines the generated /init prints (parsed from the console).
const MARK_KERNEL: &str = "SKEP-VM kernel: ";
const MARK_RESULT: &str = "SKEP-VM result: ";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fail when the guest has not finished after this many seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Only run the tests whose name contains this (passed to each test
    /// binary, as `cargo test FILTER` does).
    pub filter: Option<String>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT_SECS,
            filter: None,
        }
    }
}

fn step(msg: &str) {
    println!("[vm-test] {msg}");
}

fn vm_dir() -> PathBuf {
    util::target_dir().join("vm")
}

/// `cargo xtask vm-test`: builds the eBPF object, then boots and tests.
pub fn run(args: &Args) -> Result<()> {
    let object = ebpf::build()?;
    run_with(&object, args)
}

/// The `vm-test` phase of `cargo xtask test`.
pub fn phase(env: &TestEnv) -> Result<()> {
    run_with(&env.ebpf_object, &Args::default())
}

fn run_with(ebpf_object: &Path, args: &Args) -> Result<()> {
    let started = Instant::now();
    if let Some(filter) = &args.filter
        && !filter
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
    {
        bail!("the test filter {filter:?} may only hold letters, digits, `_`, `:` and `-`");
    }
    let qemu = preflight()?;
    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = lock(&dir)?;

    let kernel = kernel(&dir)?;
    let exit_helper = exit_helper(&dir)?;
    let tests = build_tests(ebpf_object)?;
    let accel = if kvm_usable() { "kvm" } else { "tcg" };
    let initrd = initramfs(
        &dir,
        &kernel,
        &exit_helper,
        &tests,
        args.filter.as_deref(),
        accel,
    )?;
    let prepared = started.elapsed();

    let boot = Instant::now();
    let outcome = boot_and_test(&qemu, &dir, &kernel.vmlinuz, &initrd, accel, args.timeout)?;
    let booted = boot.elapsed();
    report(&outcome, &tests);
    step(&format!(
        "time: {:.1}s preparing, {:.1}s in the guest, {:.1}s in all",
        prepared.as_secs_f64(),
        booted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    outcome.verdict()
}

/// Holds `target/vm/.lock` (released when the file is dropped): runs in
/// one checkout share the kernel, initramfs and console log.
fn lock(dir: &Path) -> Result<fs::File> {
    let path = dir.join(".lock");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(fs::TryLockError::WouldBlock) => step(&format!(
            "another vm-test holds {}; waiting for it…",
            util::display_path(&path)
        )),
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// The qemu binary, or advice to run setup; also checks the other tools.
fn preflight() -> Result<PathBuf> {
    let qemu = find_program("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("qemu-system-x86_64 is not installed: run `cargo xtask setup` (as root)")
    })?;
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing (package busybox-static): run `cargo xtask setup` (as root)");
    }
    for tool in ["dpkg-deb", "gcc", "gzip", "ldd", "strip", "timeout"] {
        if find_program(tool).is_none() {
            bail!(
                "`{tool}` is not on PATH; vm-test needs it (Debian packages dpkg, gcc, gzip, libc-bin, binutils, coreutils)"
            );
        }
    }
    Ok(qemu)
}

/// A program on PATH (or in the sbin directories a non-root PATH may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// ─── private apt configurations ──────────────────────────────────────────

/// apt with its own sources, package lists and cache (under `dir`), so
/// nothing in /etc/apt changes. dpkg's database is still the system's.
#[derive(Debug)]
pub struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    /// Writes `dir/sources.list` with one `deb` line per (uri, suite).
    pub fn new(dir: &Path, sources: &[(String, &str)]) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let mut list = String::from("# written by cargo xtask (a private apt configuration)\n");
        for (uri, suite) in sources {
            let _ = writeln!(list, "deb [signed-by={DEBIAN_KEYRING}] {uri} {suite} main");
        }
        let file = dir.join("sources.list");
        fs::write(&file, list).with_context(|| format!("writing {}", file.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `apt-get` with the private sources, lists and cache.
    pub fn apt_get(&self) -> Cmd {
        let opt = |key: &str, value: &Path| format!("{key}={}", value.display());
        Cmd::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "-o",
                &opt("Dir::Etc::sourcelist", &self.dir.join("sources.list")),
            ])
            .args(["-o", "Dir::Etc::sourceparts=-"])
            .args(["-o", &opt("Dir::State::Lists", &self.dir.join("lists"))])
            .args(["-o", &opt("Dir::Cache", &self.dir.join("cache"))])
            // Files land in directories the unprivileged _apt user may not
            // be able to write.
            .args(["-o", "APT::Sandbox::User=root"])
    }
}

const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian archive and security URIs the system's apt uses (from
/// /etc/apt/sources.list and sources.list.d, one-line or deb822 format),
/// defaulting to deb.debian.org.
pub fn debian_mirrors() -> (String, String) {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(
            more.into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // deb [options] uri suite components
                let rest = match rest.trim_start().strip_prefix('[') {
                    Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
                    None => rest,
                };
                uris.extend(rest.split_whitespace().next().map(str::to_owned));
            }
        }
    }
    let uris: Vec<String> = uris
        .into_iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    let security = uris
        .iter()
        .find(|u| u.ends_with("/debian-security"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned());
    let archive = uris
        .iter()
        .find(|u| u.ends_with("/debian"))
        .cloned()
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    (archive, security)
}

// ─── kernel ──────────────────────────────────────────────────────────────

#[derive(Debug)]
struct Kernel {
    vmlinuz: PathBuf,
    /// Module name and file, in load order (dependencies first).
    modules: Vec<(String, PathBuf)>,
}

fn sha256(path: &Path) -> Result<String> {
    let probe = Cmd::new("sha256sum").arg(path).probe()?;
    if !probe.success {
        bail!("sha256sum {} failed", path.display());
    }
    probe
        .stdout
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no output from sha256sum {}", path.display()))
}

/// Whether `path` is the kernel package with the expected checksum.
fn good_deb(path: &Path) -> Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let sum = sha256(path)?;
    if sum == KERNEL_SHA256 {
        step(&format!(
            "{}: sha256 {sum} (expected)",
            util::display_path(path)
        ));
        return Ok(true);
    }
    step(&format!(
        "{} has sha256 {sum}, expected {KERNEL_SHA256}; ignoring it",
        path.display()
    ));
    Ok(false)
}

fn download_kernel(dir: &Path) -> Result<()> {
    let (archive, security) = debian_mirrors();
    let apt = PrivateApt::new(
        &dir.join("apt-bullseye"),
        &[
            (archive.clone(), "bullseye"),
            (archive, "bullseye-updates"),
            (security, "bullseye-security"),
        ],
    )?;
    apt.apt_get()
        .arg("update")
        .hint("check network access to the Debian archive")
        .run()
        .context("updating the private bullseye package lists")?;
    apt.apt_get()
        .args(["download", &format!("{KERNEL_PACKAGE}={KERNEL_VERSION}")])
        .cwd(dir)
        .hint("the Debian archive may have dropped this kernel; the copy in ../shared/kernels/ is used instead when present")
        .run()
        .context("downloading the 5.10 kernel package")
}

/// The kernel package (downloaded or from ../shared/kernels), extracted.
fn kernel(dir: &Path) -> Result<Kernel> {
    let deb = dir.join(KERNEL_DEB);
    if good_deb(&deb)? {
        step(&format!(
            "kernel package {}: present",
            util::display_path(&deb)
        ));
    } else {
        step(&format!("downloading {KERNEL_PACKAGE} {KERNEL_VERSION}…"));
        let download = download_kernel(dir);
        if let Err(err) = &download {
            step(&format!("download failed: {err:#}"));
        }
        if !good_deb(&deb)? {
            let shared = util::workspace_root()
                .join("../shared/kernels")
                .join(KERNEL_DEB);
            step(&format!("trying the copy at {}…", shared.display()));
            if !good_deb(&shared)? {
                bail!(
                    "cannot get {KERNEL_DEB} (sha256 {KERNEL_SHA256}): the download failed and {} is absent or differs; put the package at {}",
                    shared.display(),
                    deb.display()
                );
            }
            fs::copy(&shared, &deb)
                .with_context(|| format!("copying {} to {}", shared.display(), deb.display()))?;
        }
    }

    let root = dir.join("kernel");
    let stamp = root.join(".extracted");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(KERNEL_SHA256) {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        Cmd::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .hint("the package may be damaged: delete it and rerun")
            .run()
            .context("extracting the kernel package")?;
        fs::write(&stamp, KERNEL_SHA256).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let vmlinuz = root.join(format!("boot/vmlinuz-{KERNEL_RELEASE}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing from {KERNEL_DEB}", vmlinuz.display());
    }
    let modules = resolve_modules(&root.join(format!("lib/modules/{KERNEL_RELEASE}")), MODULES)?;
    step(&format!(
        "kernel {KERNEL_RELEASE}: {}; modules (load order): {}",
        util::display_path(&vmlinuz),
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(Kernel { vmlinuz, modules })
}

/// Module names are compared with `-` and `_` folded, as modprobe does.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The `.ko` files under `modules_dir` for `wanted`, each after the
/// modules it depends on (the package has no modules.dep, so the
/// dependencies come from each module's `.modinfo` section).
fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules_dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                index.insert(module_key(stem), path.clone());
            }
        }
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit_module(name, &index, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<()> {
    let key = module_key(name);
    if !seen.insert(key.clone()) {
        return Ok(());
    }
    if depth > 32 {
        bail!("module dependencies nest too deeply at {name}");
    }
    let path = index
        .get(&key)
        .ok_or_else(|| anyhow!("kernel module {name}.ko is not in {KERNEL_DEB}"))?;
    for dep in module_depends(path)? {
        visit_module(&dep, index, seen, order, depth + 1)?;
    }
    order.push((key, path.clone()));
    Ok(())
}

/// The `depends=` list of a kernel module's `.modinfo` section.
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("parsing {} as an ELF object", path.display()))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| anyhow!("{} has no .modinfo section", path.display()))?;
    let info = section.data()?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

// ─── guest binaries ──────────────────────────────────────────────────────

const BUSYBOX: &str = "/bin/busybox";

/// Writes the verdict to the isa-debug-exit port. The cloud kernel has no
/// /dev/port, hence ioperm + outl.
const EXIT_HELPER_C: &str = r#"/* Generated by cargo xtask vm-test: writes CODE to qemu's isa-debug-exit
 * port (0xf4); qemu then exits with status (CODE << 1) | 1. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: skep-vm-exit CODE\n");
        return 2;
    }
    unsigned long code = strtoul(argv[1], NULL, 0);
    if (ioperm(0xf4, 4, 1) != 0) {
        perror("skep-vm-exit: ioperm(0xf4)");
        return 1;
    }
    outl((unsigned int)code, 0xf4);
    /* qemu 10 stops the machine shortly after the write, not at once. */
    sleep(5);
    fprintf(stderr, "skep-vm-exit: the port write did not stop the machine (no isa-debug-exit device?)\n");
    return 1;
}
"#;

/// Builds the static exit helper with gcc (when its source changed).
fn exit_helper(dir: &Path) -> Result<PathBuf> {
    let source = dir.join("skep-vm-exit.c");
    let binary = dir.join("skep-vm-exit");
    if binary.is_file() && fs::read_to_string(&source).ok().as_deref() == Some(EXIT_HELPER_C) {
        return Ok(binary);
    }
    fs::write(&source, EXIT_HELPER_C).with_context(|| format!("writing {}", source.display()))?;
    Cmd::new("gcc")
        .args(["-static", "-Os", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .hint("a static C build needs gcc and libc6-dev (glibc's libc.a)")
        .run()
        .context("building the isa-debug-exit helper")?;
    Ok(binary)
}

/// One test binary of the dataplane crate.
#[derive(Debug, Clone)]
struct TestBinary {
    /// `lib-skep_dataplane`, `test-counter_netns`, …: unique per crate.
    name: String,
    path: PathBuf,
}

/// Variables of the outer cargo that would change the inner build.
const INHERITED_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
];

/// `cargo test -p skep-dataplane --no-run`, statically linked, in its own
/// target directory; returns every test executable it reports.
fn build_tests(ebpf_object: &Path) -> Result<Vec<TestBinary>> {
    let target_dir = util::target_dir().join("vm-build");
    let mut tests = Vec::new();
    Cmd::cargo()
        .args(["test", "-p", TEST_PACKAGE, "--no-run"])
        // An explicit --target keeps RUSTFLAGS off build scripts and proc
        // macros (which must stay dynamically linked host programs).
        .args(["--target", HOST_TARGET, "--target-dir"])
        .arg(&target_dir)
        .arg("--message-format=json-render-diagnostics")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_INCREMENTAL", "0")
        .env("SKEP_EBPF_OBJECT", ebpf_object)
        .env_removes(INHERITED_ENV)
        .cwd(util::workspace_root())
        .hint("fix the compile errors above (this is the same code `cargo test -p skep-dataplane` builds, linked statically)")
        .run_reading_stdout(|line| {
            if let Some(test) = test_artifact(line)? {
                tests.push(test);
            }
            Ok(())
        })
        .context("building the dataplane tests for the VM")?;
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    tests.dedup_by(|a, b| a.name == b.name);
    if tests.is_empty() {
        bail!("cargo built no test binary for {TEST_PACKAGE}");
    }
    for test in &tests {
        ensure_static(&test.path)?;
    }
    step(&format!(
        "test binaries: {}",
        tests
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(tests)
}

/// The test executable of a cargo `compiler-artifact` message, if `line` is
/// one for a test target.
fn test_artifact(line: &str) -> Result<Option<TestBinary>> {
    if !line.starts_with('{') {
        return Ok(None);
    }
    let msg: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("parsing cargo message {line}"))?;
    if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
        return Ok(None);
    }
    let (Some(path), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
    else {
        return Ok(None);
    };
    let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
    let name = format!("{kind}-{name}").replace(
        |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
        "_",
    );
    Ok(Some(TestBinary {
        name,
        path: PathBuf::from(path),
    }))
}

/// Fails unless `path` is an ELF file without a program interpreter.
fn ensure_static(path: &Path) -> Result<()> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("parsing {} as an ELF file", path.display()))?;
    if file.section_by_name(".interp").is_some() {
        bail!(
            "{} is dynamically linked; the VM has no libraries for it (was RUSTFLAGS='-C target-feature=+crt-static' overridden, e.g. by .cargo/config.toml?)",
            path.display()
        );
    }
    Ok(())
}

/// Shared libraries (and the dynamic loader) a host binary needs, per ldd.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let probe = Cmd::new("ldd").arg(binary).probe()?;
    if !probe.success {
        bail!("`ldd {}` failed", binary.display());
    }
    let mut libs = Vec::new();
    for line in probe.stdout.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"; linux-vdso has no file.
        let file = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(file) = file.filter(|f| f.starts_with('/')) {
            libs.push(PathBuf::from(file));
        }
    }
    Ok(libs)
}

// ─── initramfs ───────────────────────────────────────────────────────────

/// Shell-safe names only go into the generated /init.
fn init_script(modules: &[String], tests: &[String], filter: Option<&str>, accel: &str) -> String {
    let filter = filter.unwrap_or("");
    format!(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test`: prepares the guest, runs each test
# binary, reports through qemu's isa-debug-exit device.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
# Tests may relax timing bounds under emulation (tcg is ~10x slower).
export SKEP_VM_ACCEL={accel}

fail() {{
    echo "SKEP-VM setup failed: $*"
    /bin/skep-vm-exit {EXIT_SETUP_FAILED}
    poweroff -f
}}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mount -t tmpfs tmpfs /run || fail "mount /run"
mount -t tmpfs tmpfs /tmp || fail "mount /tmp"
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs at /sys/fs/bpf"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mount cgroup2 at /sys/fs/cgroup"
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

echo "{MARK_KERNEL}$(uname -r)"
# Before 5.11 BPF maps count against RLIMIT_MEMLOCK; the guest keeps the
# kernel's default, as a 5.10 host without systemd would.
echo "SKEP-VM memlock limit: $(ulimit -l) KiB"
for m in {modules}; do
    insmod /lib/modules/skep/$m.ko || fail "insmod $m"
done
ip link set lo up || fail "ip link set lo up"

status=0
for t in {tests}; do
    echo "SKEP-VM running: $t"
    /tests/$t --test-threads=1 {filter} </dev/null 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "{MARK_RESULT}$t pass"
    else
        echo "{MARK_RESULT}$t FAIL (exit status $rc)"
        status=1
    fi
done
if [ $status -eq 0 ]; then
    /bin/skep-vm-exit {EXIT_PASS}
else
    /bin/skep-vm-exit {EXIT_TESTS_FAILED}
fi
echo "SKEP-VM: skep-vm-exit did not stop the machine"
poweroff -f
"#,
        modules = modules.join(" "),
        tests = tests.join(" "),
    )
}

/// Builds `target/vm/initrd.cpio.gz`.
fn initramfs(
    dir: &Path,
    kernel: &Kernel,
    exit_helper: &Path,
    tests: &[TestBinary],
    filter: Option<&str>,
    accel: &str,
) -> Result<PathBuf> {
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));
    let mut cpio = Cpio::default();
    for d in [
        "dev", "proc", "sys", "run", "tmp", "root", "etc", "usr/bin", "usr/sbin", "sbin",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", read(Path::new(BUSYBOX))?, 0o755);
    cpio.symlink("bin/sh", "busybox");
    cpio.file("bin/skep-vm-exit", read(exit_helper)?, 0o755);

    // iproute2's ip (busybox's cannot make veth pairs on 5.10) and what it
    // links against, at the same paths.
    let ip = find_program("ip")
        .ok_or_else(|| anyhow!("iproute2's `ip` is missing: run `cargo xtask setup`"))?;
    cpio.file("usr/sbin/ip", read(&ip)?, 0o755);
    for lib in shared_libraries(&ip)? {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
        cpio.file(&inside, read(&lib)?, 0o755);
    }

    let mut module_names = Vec::new();
    for (name, path) in &kernel.modules {
        cpio.file(&format!("lib/modules/skep/{name}.ko"), read(path)?, 0o644);
        module_names.push(name.clone());
    }

    // Debug info makes the binaries ~4x larger; symbols stay for backtraces.
    let stripped = dir.join("stripped");
    fs::create_dir_all(&stripped).with_context(|| format!("creating {}", stripped.display()))?;
    let mut test_names = Vec::new();
    for test in tests {
        let out = stripped.join(&test.name);
        Cmd::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&out)
            .arg(&test.path)
            .hint("strip comes with binutils (installed with gcc)")
            .run()?;
        cpio.file(&format!("tests/{}", test.name), read(&out)?, 0o755);
        test_names.push(test.name.clone());
    }
    cpio.file(
        "init",
        init_script(&module_names, &test_names, filter, accel).into_bytes(),
        0o755,
    );

    let archive = dir.join("initrd.cpio");
    let gz = dir.join("initrd.cpio.gz");
    fs::write(&archive, cpio.encode()).with_context(|| format!("writing {}", archive.display()))?;
    Cmd::new("gzip")
        .args(["-f", "-n", "-6"])
        .arg(&archive)
        .run()
        .context("compressing the initramfs")?;
    step(&format!(
        "initramfs {}: {}",
        util::display_path(&gz),
        util::file_size(&gz)?
    ));
    Ok(gz)
}

/// A cpio archive in the "newc" format the kernel unpacks as initramfs.
/// Parent directories are added automatically; entries are written sorted,
/// so each directory precedes its contents.
#[derive(Debug, Default)]
struct Cpio {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

impl Cpio {
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    }

    fn insert(&mut self, path: &str, entry: Entry) {
        self.parents(path);
        self.entries.insert(path.to_owned(), entry);
    }

    fn dir(&mut self, path: &str) {
        self.insert(path, Entry::Dir);
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.insert(path, Entry::File { data, mode });
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Entry::Symlink(target.to_owned()));
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Entry::CharDevice { major, minor });
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 0;
        for (path, entry) in &self.entries {
            ino += 1;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040_755, 2, &[], (0, 0)),
                Entry::File { data, mode } => (0o100_000 | mode, 1, data, (0, 0)),
                Entry::Symlink(target) => (0o120_777, 1, target.as_bytes(), (0, 0)),
                Entry::CharDevice { major, minor } => (0o020_600, 1, &[], (*major, *minor)),
            };
            Self::record(&mut out, path, ino, mode, nlink, data, rdev);
        }
        Self::record(&mut out, "TRAILER!!!", 0, 0, 1, &[], (0, 0));
        out
    }

    fn record(
        out: &mut Vec<u8>,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) {
        let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(4), 0);
        // Sizes above 4 GiB cannot occur in an initramfs this tool builds.
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let name_size = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        out.extend_from_slice(b"070701");
        for field in fields {
            out.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(out);
        out.extend_from_slice(data);
        pad(out);
    }
}

// ─── boot ────────────────────────────────────────────────────────────────

/// What the guest showed on its console and how qemu ended.
#[derive(Debug, Default)]
struct Outcome {
    /// qemu's exit status (through `timeout`); `None` when killed by a signal.
    status: Option<i32>,
    timeout_secs: u64,
    kernel: Option<String>,
    /// Per test binary: (name, passed, detail).
    binaries: Vec<(String, bool, String)>,
    /// Per test: (binary, test name, result as libtest printed it).
    tests: Vec<(String, String, String)>,
    setup_failure: Option<String>,
    /// The test binary started last and not finished.
    running: Option<String>,
    console_log: PathBuf,
}

impl Outcome {
    fn observe(&mut self, line: &str) {
        // A marker may follow firmware output that ended without a newline.
        let line = line.find("SKEP-VM ").map_or(line, |at| &line[at..]);
        if let Some(version) = line.strip_prefix(MARK_KERNEL) {
            self.kernel = Some(version.trim().to_owned());
        } else if let Some(name) = line.strip_prefix("SKEP-VM running: ") {
            self.running = Some(name.trim().to_owned());
        } else if let Some(result) = line.strip_prefix(MARK_RESULT) {
            let (name, verdict) = result.split_once(' ').unwrap_or((result, ""));
            self.binaries
                .push((name.to_owned(), verdict == "pass", verdict.to_owned()));
            self.running = None;
        } else if let Some(why) = line.strip_prefix("SKEP-VM setup failed: ") {
            self.setup_failure = Some(why.to_owned());
        } else if let (Some(binary), Some(rest)) =
            (self.running.as_ref(), line.strip_prefix("test "))
            && let Some((name, result)) = rest.rsplit_once(" ... ")
        {
            self.tests
                .push((binary.clone(), name.to_owned(), result.trim().to_owned()));
        }
    }

    fn verdict(&self) -> Result<()> {
        let log = util::display_path(&self.console_log);
        let code = |c: u8| i32::from(c) << 1 | 1;
        match self.status {
            Some(s) if s == code(EXIT_PASS) => {
                if self.binaries.is_empty() || self.binaries.iter().any(|(_, ok, _)| !ok) {
                    bail!(
                        "the guest reported success but the console shows no passing run; see {log}"
                    );
                }
                Ok(())
            }
            Some(s) if s == code(EXIT_TESTS_FAILED) => {
                let failed: Vec<&str> = self
                    .binaries
                    .iter()
                    .filter(|(_, ok, _)| !ok)
                    .map(|(n, _, _)| n.as_str())
                    .collect();
                bail!(
                    "tests failed on Linux {}: {} (their output is above and in {log}); rerun one with `cargo xtask vm-test NAME`",
                    self.kernel.as_deref().unwrap_or("5.10"),
                    failed.join(", ")
                )
            }
            Some(s) if s == code(EXIT_SETUP_FAILED) => bail!(
                "the guest could not prepare the test environment ({}); see {log}",
                self.setup_failure
                    .as_deref()
                    .unwrap_or("reason not printed")
            ),
            Some(124 | 137) | None => bail!(
                "the guest did not finish within {} s and was killed ({}); see {log}, or raise `cargo xtask vm-test --timeout SECS`",
                self.timeout_secs,
                match (&self.running, &self.kernel) {
                    (Some(binary), _) => format!("test binary {binary} was running"),
                    (None, Some(_)) => "hung after boot".to_owned(),
                    (None, None) => "hung before /init ran".to_owned(),
                }
            ),
            Some(0) => bail!(
                "the guest stopped without reporting a verdict (kernel panic, or /init died); see {log}"
            ),
            Some(s) => bail!(
                "qemu exited with status {s} before the guest reported (qemu error? see its messages above and {log})"
            ),
        }
    }
}

/// Whether KVM can run guests here (/dev/kvm alone is not enough: without
/// vmx/svm the guest hangs).
fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
}

fn boot_and_test(
    qemu: &Path,
    dir: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    accel: &str,
    timeout_secs: u64,
) -> Result<Outcome> {
    step(&format!(
        "booting Linux {KERNEL_RELEASE} under qemu ({accel}), at most {timeout_secs} s…"
    ));
    let console_log = dir.join("console.log");
    let mut log = fs::File::create(&console_log)
        .with_context(|| format!("creating {}", console_log.display()))?;
    let mut outcome = Outcome {
        timeout_secs,
        console_log: console_log.clone(),
        ..Outcome::default()
    };
    let status = Cmd::new("timeout")
        .args(["--kill-after=10", &timeout_secs.to_string()])
        .arg(qemu)
        .args(["-accel", accel, "-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .run_streaming(|raw| {
            let line = &plain_text(raw);
            println!("  | {line}");
            let _ = writeln!(log, "{line}");
            outcome.observe(line);
        })?;
    outcome.status = status.code();
    Ok(outcome)
}

/// A console line without terminal control sequences (SeaBIOS and the
/// kernel reset and clear the screen, which would garble the terminal and
/// hide the markers).
fn plain_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI ("ESC [" parameters, then a final byte in @..~); any other
            // escape is two characters long (e.g. "ESC c", reset).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

fn report(outcome: &Outcome, tests: &[TestBinary]) {
    step("summary:");
    step(&format!(
        "  guest kernel (uname -r): {}",
        outcome
            .kernel
            .as_deref()
            .unwrap_or("(not printed: the guest did not get that far)")
    ));
    for test in tests {
        let result = outcome.binaries.iter().find(|(n, _, _)| *n == test.name);
        let verdict = match result {
            Some((_, true, _)) => "pass".to_owned(),
            Some((_, false, detail)) => detail.clone(),
            None => "did not run".to_owned(),
        };
        step(&format!("  {:<40} {verdict}", test.name));
        for (_, name, result) in outcome.tests.iter().filter(|(b, _, _)| *b == test.name) {
            step(&format!("      {name} ... {result}"));
        }
    }
    step(&format!(
        "  console log: {}",
        util::display_path(&outcome.console_log)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut cpio = Cpio::default();
        cpio.file("a/b", b"hello".to_vec(), 0o644);
        let bytes = cpio.encode();
        // "a" (dir), "a/b" (file), trailer; every record 4-byte aligned.
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text.matches("070701").count(), 3, "{text}");
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        assert_eq!(bytes.len() % 4, 0);
        // The first header: ino 1, mode 040755, nlink 2, name size 2 ("a\0").
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[14..22], b"000041ED");
        assert_eq!(&bytes[94..102], b"00000002");
    }

    #[test]
    fn test_artifacts_from_cargo_messages() {
        let line = r#"{"reason":"compiler-artifact","profile":{"test":true},"target":{"name":"counter_netns","kind":["test"]},"executable":"/t/counter_netns-1"}"#;
        let test = test_artifact(line).unwrap().unwrap();
        assert_eq!(test.name, "test-counter_netns");
        assert_eq!(test.path, PathBuf::from("/t/counter_netns-1"));
        let lib = r#"{"reason":"compiler-artifact","profile":{"test":false},"target":{"name":"aya","kind":["lib"]},"executable":null}"#;
        assert!(test_artifact(lib).unwrap().is_none());
        assert!(test_artifact("warning").unwrap().is_none());
    }

    #[test]
    fn control_sequences_are_removed() {
        assert_eq!(
            plain_text("\x1bc\x1b[?7l\x1b[2JSKEP-VM kernel: 5.10\r"),
            "SKEP-VM kernel: 5.10"
        );
        assert_eq!(plain_text("a\tb"), "a\tb");
    }

    #[test]
    fn console_parsing() {
        let mut outcome = Outcome::default();
        for line in [
            "Booting from ROM...SKEP-VM kernel: 5.10.0-32-cloud-amd64",
            "SKEP-VM running: test-counter_netns",
            "test tc_count_counts ... ok",
            "SKEP-VM result: test-counter_netns pass",
            "test stray ... ok",
        ] {
            outcome.observe(line);
        }
        assert_eq!(outcome.kernel.as_deref(), Some("5.10.0-32-cloud-amd64"));
        assert_eq!(outcome.binaries.len(), 1);
        assert!(outcome.binaries[0].1);
        assert_eq!(outcome.tests.len(), 1);
        outcome.status = Some(i32::from(EXIT_PASS) << 1 | 1);
        outcome.verdict().unwrap();
        outcome.status = Some(124);
        assert!(
            outcome
                .verdict()
                .unwrap_err()
                .to_string()
                .contains("did not finish")
        );
    }

    #[test]
    fn modules_without_dependencies_resolve_in_order() {
        let dir = util::target_dir()
            .join("vm/kernel/lib/modules")
            .join(KERNEL_RELEASE);
        if !dir.is_dir() {
            eprintln!(
                "skipped: {} not extracted (run `cargo xtask vm-test`)",
                dir.display()
            );
            return;
        }
        let order = resolve_modules(&dir, MODULES).unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        for m in MODULES {
            assert!(names.contains(m), "{names:?}");
        }
    }
}
