//! `cargo xtask setup`: installs what is missing to build and test skep on a
//! fresh Debian 12 machine. Every step first checks, so running it again
//! only reports "present".

use std::fs;

use anyhow::{Context, Result, bail};

use crate::{
    util::{self, Cmd},
    vm_test,
};

/// The nightly toolchain builds the eBPF programs (`-Z build-std=core`).
pub const NIGHTLY: &str = "nightly";

/// The bpf-linker release that can use the Rust toolchain's own LLVM 22
/// (newer ones need a system LLVM ≥ 21, which Debian 12 lacks).
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// The constant-rate HTTP load generator of `cargo xtask bench mesh`.
pub const OHA_VERSION: &str = "1.16.0";

/// Debian packages the tests and benchmarks use (qemu: see [`qemu`]).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "etcd-server",
    "etcd-client",
    "iptables",
    "conntrack",
    // bench policy: the ipset flavour of iptables-based policy engines.
    "ipset",
    // etcd-client generates its gRPC code with protoc at build time.
    "protobuf-compiler",
    // vm-test: the guest's shell and tools (statically linked); gcc and
    // libc6-dev build its static exit helper, binutils strips the test
    // binaries, the keyring signs the private apt sources.
    "busybox-static",
    "gcc",
    "libc6-dev",
    "binutils",
    "debian-archive-keyring",
    // API tests talk HTTP to the server directly and mint client
    // certificates.
    "curl",
    "openssl",
    // `cargo xtask bench dns`: the load generator and the peer servers
    // (dnsmasq-base, not dnsmasq: the latter starts a system service).
    "dnsperf",
    "dnsmasq-base",
    "unbound",
    "nsd",
    // The docker runtime's tests start a private dockerd.
    "docker.io",
    // The web console's browser tests (control/skep/tests/console_browser.rs).
    "chromium",
    "chromium-driver",
    // `cargo xtask bench ingress`: the peer proxy and the load generators.
    "nginx",
    "wrk",
    "nghttp2-client",
    // `cargo xtask bench mesh`: the OpenSSL proxy the sidecar is compared with.
    "stunnel4",
];

/// Python packages of the API tests: the official Kubernetes client, pinned.
const PIP_PACKAGES: &[(&str, &str)] = &[("kubernetes", "33.1.0")];

/// qemu for vm-test, from bookworm-backports: the image ships qemu-utils at
/// this version, and bookworm's own qemu-system-x86 (7.2) would replace it.
const QEMU_VERSION: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "qemu-utils",
];

const BPFFS: &str = "/sys/fs/bpf";

fn step(msg: &str) {
    println!("[setup] {msg}");
}

pub fn run() -> Result<()> {
    let root = util::is_root()?;
    nightly_toolchain()?;
    rust_src()?;
    bpf_linker()?;
    oha()?;
    apt_packages(root)?;
    qemu(root)?;
    bpffs(root)?;
    guard_cluster_ranges(root)?;
    pip_packages()?;
    step("done: everything is in place");
    Ok(())
}

fn rustup() -> Cmd {
    Cmd::new("rustup").hint(
        "install rustup (https://rustup.rs) and make sure ~/.cargo/bin is on PATH, then run `cargo xtask setup`",
    )
}

/// Whether rustup knows a `nightly-…` toolchain.
pub fn nightly_present() -> Result<bool> {
    let probe = rustup().args(["toolchain", "list"]).probe()?;
    Ok(probe.success
        && probe
            .stdout
            .lines()
            .any(|line| line.trim_start().starts_with(&format!("{NIGHTLY}-"))))
}

/// Whether the nightly toolchain has the `rust-src` component.
pub fn rust_src_present() -> bool {
    rustup()
        .args(["component", "list", "--toolchain", NIGHTLY, "--installed"])
        .probe()
        .is_ok_and(|p| {
            p.success
                && p.stdout
                    .lines()
                    .any(|line| line.trim().starts_with("rust-src"))
        })
}

/// The version `bpf-linker --version` reports, `None` if it does not run.
pub fn bpf_linker_version() -> Option<String> {
    let probe = Cmd::new("bpf-linker").arg("--version").probe().ok()?;
    if !probe.success {
        return None;
    }
    // "bpf-linker 0.10.0"
    probe.stdout.split_whitespace().nth(1).map(str::to_owned)
}

fn nightly_toolchain() -> Result<()> {
    if nightly_present()? {
        step("nightly toolchain: present");
        return Ok(());
    }
    step("installing the nightly toolchain…");
    rustup()
        .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
        .hint("check network access to static.rust-lang.org")
        .run()
        .context("installing the nightly toolchain")
}

fn rust_src() -> Result<()> {
    if rust_src_present() {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("installing rust-src for nightly…");
    rustup()
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
        .hint("check network access to static.rust-lang.org")
        .run()
        .context("installing rust-src for nightly")
}

fn bpf_linker() -> Result<()> {
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {
            step(&format!("bpf-linker {v}: present"));
            return Ok(());
        }
        Some(v) => step(&format!(
            "bpf-linker {v} found, need {BPF_LINKER_VERSION}; installing bpf-linker {BPF_LINKER_VERSION} (about 4 minutes)…"
        )),
        None => step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} (about 4 minutes on 2 cores)…"
        )),
    }
    Cmd::cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "rust-llvm-22",
            "--locked",
        ])
        .hint("bpf-linker 0.10.0 links against the Rust toolchain's LLVM 22 (feature rust-llvm-22); check network access to crates.io")
        .run()
        .context("installing bpf-linker")?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        Some(v) => bail!(
            "`bpf-linker --version` still reports {v} after installing {BPF_LINKER_VERSION}: another bpf-linker comes first on PATH (`which -a bpf-linker`)"
        ),
        None => bail!(
            "bpf-linker was installed but `bpf-linker` does not run: put ~/.cargo/bin on PATH"
        ),
    }
}

/// The version `oha --version` reports, `None` if it does not run.
pub fn oha_version() -> Option<String> {
    let probe = Cmd::new("oha").arg("--version").probe().ok()?;
    if !probe.success {
        return None;
    }
    // "oha 1.16.0"
    probe.stdout.split_whitespace().nth(1).map(str::to_owned)
}

fn oha() -> Result<()> {
    if let Some(v) = oha_version() {
        step(&format!("oha {v}: present"));
        return Ok(());
    }
    step(&format!(
        "installing oha {OHA_VERSION} (the mesh benchmark's load generator; a few minutes)…"
    ));
    Cmd::cargo()
        .args(["install", &format!("oha@{OHA_VERSION}"), "--locked"])
        .hint("check network access to crates.io")
        .run()
        .context("installing oha")?;
    if oha_version().is_none() {
        bail!("oha was installed but `oha` does not run: put ~/.cargo/bin on PATH");
    }
    Ok(())
}

/// The packages from `wanted` that dpkg does not report as installed.
fn missing_apt_packages(wanted: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits 1 when some package is unknown but still lists the
    // others, so the listing decides, not the status.
    let probe = Cmd::new("dpkg-query")
        .args(["-W", "-f", "${Package}\\t${db:Status-Abbrev}\\n"])
        .args(wanted)
        .probe()
        .context("setup expects a Debian (12) machine, with dpkg")?;
    let installed: Vec<&str> = probe
        .stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name)
        .collect();
    Ok(wanted
        .iter()
        .filter(|pkg| !installed.contains(pkg))
        .map(|pkg| (*pkg).to_owned())
        .collect())
}

fn apt_packages(root: bool) -> Result<()> {
    let missing = missing_apt_packages(APT_PACKAGES)?;
    if missing.is_empty() {
        step(&format!(
            "apt packages ({}): present",
            APT_PACKAGES.join(", ")
        ));
        return Ok(());
    }
    if !root {
        bail!(
            "run as root: setup installs apt packages (missing: {})",
            missing.join(", ")
        );
    }
    step(&format!("installing apt packages: {}…", missing.join(", ")));
    let apt = |cmd: Cmd| cmd.env("DEBIAN_FRONTEND", "noninteractive");
    apt(Cmd::new("apt-get").arg("update"))
        .hint("check the apt sources in /etc/apt and network access to the Debian mirror")
        .run()
        .context("updating apt package lists")?;
    apt(Cmd::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
    .hint("see apt-get's messages above; `dpkg --configure -a` repairs an interrupted install")
    .run()
    .context("installing apt packages")?;
    let still = missing_apt_packages(APT_PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt-get succeeded but these packages are still not installed: {}",
            still.join(", ")
        );
    }
    Ok(())
}

/// qemu-system-x86 and friends at [`QEMU_VERSION`], installed through a
/// private apt configuration (bookworm + backports; /etc/apt is not
/// touched) with `-t bookworm-backports` (qemu 10 needs seabios from
/// there) and `--no-remove`, so nothing already installed is removed.
fn qemu(root: bool) -> Result<()> {
    if let Some(path) = vm_test::find_program("qemu-system-x86_64") {
        step(&format!("qemu-system-x86_64: present ({})", path.display()));
        return Ok(());
    }
    if !root {
        bail!("run as root: setup installs qemu-system-x86 {QEMU_VERSION} for vm-test");
    }
    step(&format!(
        "installing qemu-system-x86 {QEMU_VERSION} from bookworm-backports (private apt configuration in target/vm/apt-bookworm)…"
    ));
    let (archive, security) = vm_test::debian_mirrors();
    let apt = vm_test::PrivateApt::new(
        &util::target_dir().join("vm/apt-bookworm"),
        &[
            (archive.clone(), "bookworm"),
            (archive.clone(), "bookworm-updates"),
            (archive, "bookworm-backports"),
            (security, "bookworm-security"),
        ],
    )?;
    apt.apt_get()
        .arg("update")
        .hint("check network access to the Debian archive")
        .run()
        .context("updating the private bookworm(-backports) package lists")?;
    apt.apt_get()
        .args(["install", "-y", "--no-install-recommends", "--no-remove"])
        .args(["-t", "bookworm-backports"])
        .args(QEMU_PACKAGES.iter().map(|p| format!("{p}={QEMU_VERSION}")))
        .hint("see apt-get's messages above; `dpkg --configure -a` repairs an interrupted install")
        .run()
        .context("installing qemu from bookworm-backports")?;
    if vm_test::find_program("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86 was installed but qemu-system-x86_64 is not on PATH");
    }
    Ok(())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, mountpoint, fstype) = (fields.next(), fields.next(), fields.next());
        mountpoint == Some(BPFFS) && fstype == Some("bpf")
    }))
}

fn bpffs(root: bool) -> Result<()> {
    if bpffs_mounted()? {
        step(&format!("bpffs at {BPFFS}: mounted"));
        return Ok(());
    }
    if !root {
        bail!("run as root: setup mounts bpffs at {BPFFS} (`mount -t bpf bpf {BPFFS}`)");
    }
    step(&format!("mounting bpffs at {BPFFS}…"));
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .hint("the kernel needs CONFIG_BPF_SYSCALL; inside a container, run it with --privileged")
        .run()
        .context("mounting bpffs")
}

/// The pod and service ranges as unreachable in the host's own routing
/// table: a cluster or test that runs a node in the root network namespace
/// (the dataplane test of node_agent does) can then never send 10.42/16 or
/// 10.43/16 traffic out of the default route. More specific routes that
/// skep adds (a node's pod CIDR) still win; namespaces have their own
/// tables and are not affected.
const GUARDED_RANGES: [&str; 2] = ["10.42.0.0/16", "10.43.0.0/16"];

fn guard_cluster_ranges(root: bool) -> Result<()> {
    for range in GUARDED_RANGES {
        let probe = Cmd::new("ip")
            .args(["-4", "route", "show", "type", "unreachable", range])
            .probe()?;
        if probe.success && !probe.stdout.trim().is_empty() {
            step(&format!("unreachable route for {range}: present"));
            continue;
        }
        if !root {
            bail!(
                "run as root: setup adds `ip route add unreachable {range}` so cluster ranges never leave by the default route"
            );
        }
        step(&format!(
            "adding an unreachable route for {range} (host namespace)…"
        ));
        Cmd::new("ip")
            .args(["route", "replace", "unreachable", range])
            .run()
            .with_context(|| format!("adding the unreachable route for {range}"))?;
    }
    Ok(())
}

/// Installs the pinned Python packages the API tests use, unless the
/// installed version already matches.
fn pip_packages() -> Result<()> {
    for (name, version) in PIP_PACKAGES {
        let probe = Cmd::new("python3")
            .args([
                "-c",
                &format!("import importlib.metadata as m; print(m.version({name:?}))"),
            ])
            .probe()?;
        if probe.success && probe.stdout.trim() == *version {
            step(&format!("python package {name}=={version}: present"));
            continue;
        }
        step(&format!("installing python package {name}=={version}…"));
        Cmd::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("{name}=={version}"),
            ])
            .hint("pip must reach PyPI; check `python3 -m pip --version` and the network")
            .run()?;
    }
    Ok(())
}
