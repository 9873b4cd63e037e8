//! Running commands (each one echoed as `$ …` before it runs), workspace
//! paths and small helpers shared by the subcommands.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result, anyhow, bail};

/// A command to run, with what it needs to be echoed and explained on failure.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    /// How the program is shown in the echo (`cargo`, not the full path of
    /// the toolchain's cargo binary).
    shown_as: String,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    env_removes: Vec<OsString>,
    hint: Option<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref().to_os_string();
        let shown_as = Path::new(&program)
            .file_name()
            .unwrap_or(&program)
            .to_string_lossy()
            .into_owned();
        Self {
            program,
            shown_as,
            args: Vec::new(),
            cwd: None,
            envs: Vec::new(),
            env_removes: Vec::new(),
            hint: None,
        }
    }

    /// The cargo that runs xtask (the `CARGO` variable cargo sets for
    /// `cargo run`), so inner builds use the same toolchain; plain `cargo`
    /// when xtask was started some other way.
    pub fn cargo() -> Self {
        let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        Self::new(program).shown_as("cargo")
    }

    /// rustup's `cargo` proxy, which understands `+toolchain`. `CARGO` points
    /// at a toolchain's own cargo binary, which does not.
    pub fn rustup_cargo(toolchain: &str) -> Self {
        let proxy = cargo_home()
            .map(|home| home.join("bin/cargo"))
            .filter(|p| p.is_file())
            .map_or_else(|| OsString::from("cargo"), PathBuf::into_os_string);
        Self::new(proxy)
            .shown_as("cargo")
            .arg(format!("+{toolchain}"))
    }

    pub fn shown_as(mut self, name: &str) -> Self {
        self.shown_as = name.to_owned();
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    pub fn env_removes(mut self, keys: &[&str]) -> Self {
        self.env_removes.extend(keys.iter().map(OsString::from));
        self
    }

    /// What to tell the user when this command fails.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The command line as echoed: `VAR=value cargo build … (in dir)`.
    pub fn render(&self) -> String {
        let mut line = String::new();
        for (key, value) in &self.envs {
            let _ = write!(line, "{}={} ", key.to_string_lossy(), shell_quote(value));
        }
        line.push_str(&self.shown_as);
        for arg in &self.args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        if let Some(dir) = &self.cwd
            && dir != workspace_root()
        {
            let _ = write!(line, "   (in {})", display_path(dir));
        }
        line
    }

    /// Short form for error messages: program and arguments only.
    fn short(&self) -> String {
        let mut line = self.shown_as.clone();
        for arg in &self.args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        line
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        for key in &self.env_removes {
            cmd.env_remove(key);
        }
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        cmd
    }

    fn spawn_error(&self, err: std::io::Error) -> anyhow::Error {
        let mut msg = format!("cannot run `{}`: {err}", self.short());
        if let Some(hint) = &self.hint {
            let _ = write!(msg, "\n  hint: {hint}");
        }
        anyhow!(msg)
    }

    fn check(&self, status: ExitStatus) -> Result<()> {
        if status.success() {
            return Ok(());
        }
        let mut msg = format!("`{}` failed ({})", self.short(), describe_status(status));
        if let Some(hint) = &self.hint {
            let _ = write!(msg, "\n  hint: {hint}");
        }
        bail!(msg)
    }

    /// Echoes the command, runs it with inherited stdio and fails unless it
    /// exits with status 0.
    pub fn run(&self) -> Result<()> {
        println!("$ {}", self.render());
        let status = self.command().status().map_err(|e| self.spawn_error(e))?;
        self.check(status)
    }

    /// Echoes and runs the command, passing each line of its stdout to
    /// `on_line` (stderr stays on the terminal); fails unless it exits with 0.
    pub fn run_reading_stdout(&self, mut on_line: impl FnMut(&str) -> Result<()>) -> Result<()> {
        println!("$ {}", self.render());
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("`{}`: stdout was not captured", self.short()))?;
        let mut first_error = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.with_context(|| format!("reading output of `{}`", self.short()))?;
            if first_error.is_none()
                && let Err(e) = on_line(&line)
            {
                first_error = Some(e);
            }
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.short()))?;
        self.check(status)?;
        first_error.map_or(Ok(()), Err)
    }

    /// Echoes and runs the command with stdin closed, passing each line of
    /// its stdout (lossily decoded, `\r` removed) to `on_line` as it comes;
    /// stderr stays on the terminal. Returns the exit status, whatever it
    /// is: the caller decides what it means.
    pub fn run_streaming(&self, mut on_line: impl FnMut(&str)) -> Result<ExitStatus> {
        println!("$ {}", self.render());
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("`{}`: stdout was not captured", self.short()))?;
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("reading output of `{}`", self.short()))?;
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf);
            on_line(line.trim_end_matches(['\n', '\r']).trim_start_matches('\r'));
        }
        child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.short()))
    }

    /// Echoes and runs a check (a query whose answer decides what to do):
    /// its exit status and stdout, whatever the status. Fails only when the
    /// program cannot be started (not installed, not on PATH…).
    pub fn probe(&self) -> Result<Probe> {
        println!("$ {}", self.render());
        let output = self
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        Ok(Probe {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        })
    }
}

/// What a [`Cmd::probe`] saw.
#[derive(Debug)]
pub struct Probe {
    pub success: bool,
    pub stdout: String,
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Quotes an argument for the echo when a shell would need it.
fn shell_quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest)
}

/// Cargo's target directory for the workspace: `CARGO_TARGET_DIR` when set
/// (relative to the workspace root, where xtask runs cargo), else `target/`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Bytes free (for root) on the filesystem holding `path`, or None when
/// statvfs fails (the caller only uses it for a diagnostic).
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// `$CARGO_HOME`, else `~/.cargo`.
pub fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// A path relative to the workspace root when it is inside it.
pub fn display_path(path: &Path) -> String {
    match path.strip_prefix(workspace_root()) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".to_owned(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// A file's size for reports: `1424 bytes (1.4 KiB)`.
pub fn file_size(path: &Path) -> Result<String> {
    let bytes = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(human_size(bytes))
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    // Display only: the precision lost converting to f64 does not matter.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{bytes} bytes ({value:.1} {})", UNITS[unit])
}

/// Whether this process runs with effective uid 0 (from /proc/self/status,
/// so no libc binding is needed).
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no effective uid in /proc/self/status"))?;
    Ok(euid == "0")
}

/// Fails with `why` unless running as root.
pub fn require_root(why: &str) -> Result<()> {
    if is_root()? {
        Ok(())
    } else {
        bail!("run as root: {why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_the_echo() {
        assert_eq!(shell_quote(OsStr::new("build-std=core")), "build-std=core");
        assert_eq!(shell_quote(OsStr::new("a b")), "'a b'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
    }

    #[test]
    fn echo_shows_env_and_directory() {
        let cmd = Cmd::new("/usr/bin/env")
            .args(["true", "x y"])
            .env("K", "v 1")
            .cwd(workspace_root().join("ebpf"));
        assert_eq!(cmd.render(), "K='v 1' env true 'x y'   (in ebpf)");
    }

    #[test]
    fn failure_names_command_status_and_hint() {
        let err = Cmd::new("sh")
            .args(["-c", "exit 3"])
            .hint("do this")
            .run()
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`sh -c 'exit 3'` failed (exit status 3)"),
            "{msg}"
        );
        assert!(msg.contains("hint: do this"), "{msg}");
    }

    #[test]
    fn missing_program_is_reported() {
        let err = Cmd::new("skep-no-such-program").probe().unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot run `skep-no-such-program`"),
            "{err}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(human_size(10), "10 bytes");
        assert_eq!(human_size(1432), "1432 bytes (1.4 KiB)");
        assert_eq!(human_size(3 << 20), "3145728 bytes (3.0 MiB)");
    }
}
