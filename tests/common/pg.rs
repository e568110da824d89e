//! A throwaway PostgreSQL cluster for tests: Debian's server binaries (`scripts/setup` installs
//! the `postgresql` package), `initdb` into a temporary folder and `pg_ctl` on a free loopback
//! port, stopped and removed when dropped. `initdb` refuses root: as root, every server binary
//! runs as the `postgres` system user, which owns the folder.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    user: Option<(u32, u32)>,
    durable: bool,
}

impl PgCluster {
    /// initdb and start (fsync off: a test's cluster need not survive a power cut).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// initdb and start; `durable`: fsync, full-page writes and synchronous commits on, as a
    /// production server runs (benchmarks).
    pub fn start_with(durable: bool) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("labelfool-pg").tempdir().unwrap();
        let user = if unsafe { libc::geteuid() } == 0 { Some(postgres_user()) } else { None };
        if let Some((uid, gid)) = user {
            chown(dir.path(), uid, gid);
        }
        let port = free_port();
        let c = Self { bin, dir, port, user, durable };
        c.run("initdb", |cmd| {
            cmd.arg("-D").arg(c.data()).args([
                "-U",
                "labelfool",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]);
        });
        c.start_server();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: impl FnOnce(&mut Command)) {
        let mut cmd = Command::new(self.bin.join(tool));
        args(&mut cmd);
        cmd.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{}\nlog: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// Starts the server again (after `stop`), on the same port.
    pub fn start_server(&self) {
        let unsafe_fast =
            if self.durable { "" } else { "-c fsync=off -c synchronous_commit=off -c full_page_writes=off" };
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} {unsafe_fast} -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        self.run("pg_ctl", |cmd| {
            cmd.arg("-D").arg(self.data()).args(["-w", "-t", "60", "-l"]).arg(&log).args(["-o", &opts, "start"]);
        });
    }

    /// Stops the server (fast: sessions are cut, as an outage would).
    pub fn stop(&self) {
        self.run("pg_ctl", |cmd| {
            cmd.arg("-D").arg(self.data()).args(["-w", "-m", "fast", "stop"]);
        });
    }

    /// A new database in the cluster, as a DSN.
    pub fn database(&self, name: &str) -> String {
        let port = self.port.to_string();
        self.run("createdb", |cmd| {
            cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "labelfool", name]);
        });
        format!("postgres://labelfool@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.data()).args(["-w", "-m", "immediate", "stop"]);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.output();
    }
}

/// `LABELFOOL_PG_BIN`, or the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps the
/// server binaries off `PATH`).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LABELFOOL_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("no /usr/lib/postgresql: scripts/setup installs the postgresql package")
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect("no PostgreSQL server under /usr/lib/postgresql")
}

fn postgres_user() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no `postgres` user (the postgresql package makes it)");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
