//! Who owns an in-progress ledger row, and whether that owner is still alive.
//!
//! An [`Owner`] names one run of the incoming code: the host it runs on (hostname, machine id,
//! boot id, PID namespace), its pid and the pid's start time (so a recycled pid is not taken
//! for the original process), plus a random run id (so two runs inside one process differ).

use std::fmt;
use std::fs;

/// One run of the incoming code, as recorded on the ledger rows it claims.
#[derive(Clone, PartialEq, Eq)]
pub struct Owner {
    run_id: String,
    host: String,
    machine_id: String,
    boot_id: String,
    pid_ns: String,
    pid: u32,
    start_ticks: u64,
}

impl Owner {
    /// A new, unique owner for a run of this process (random run id, this host and pid).
    pub fn new_run() -> Owner {
        let pid = std::process::id();
        let host = read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".into());
        let random: [u8; 8] = rand::random();
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let start_ticks = process_start_ticks(pid).unwrap_or(0);
        Owner {
            run_id: format!("{host}:{pid}:{hex}"),
            host,
            machine_id: read_trimmed("/etc/machine-id").unwrap_or_default(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            pid_ns: fs::read_link("/proc/self/ns/pid")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid,
            start_ticks,
        }
    }

    /// An owner with an explicit identity: for tools and tests that stand in for another run
    /// (another host, a process that died). `new_run` is what the incoming code uses.
    pub fn from_parts(
        run_id: impl Into<String>,
        host: impl Into<String>,
        machine_id: impl Into<String>,
        boot_id: impl Into<String>,
        pid_ns: impl Into<String>,
        pid: u32,
        start_ticks: u64,
    ) -> Owner {
        Owner {
            run_id: run_id.into(),
            host: host.into(),
            machine_id: machine_id.into(),
            boot_id: boot_id.into(),
            pid_ns: pid_ns.into(),
            pid,
            start_ticks,
        }
    }

    /// The same machine, boot and PID namespace as `self`, but another run id, pid and start.
    pub fn sibling(&self, run_id: impl Into<String>, pid: u32, start_ticks: u64) -> Owner {
        Owner {
            run_id: run_id.into(),
            pid,
            start_ticks,
            ..self.clone()
        }
    }

    /// The unique id of the run (`host:pid:random`).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }
    pub fn pid_ns(&self) -> &str {
        &self.pid_ns
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// The process start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// Whether `other` (the recorded owner of a row) is known to be dead, judged from `self`'s
    /// host. Only a process of the same running kernel (equal, known boot id) and PID
    /// namespace can be judged: it is dead when its pid is gone or a zombie, or the pid now
    /// belongs to a process started at another time. Anything else is presumed alive (the
    /// lease decides): hostname, machine id and the PID namespace link do not tell machines
    /// apart (cloned VMs, containers, every host's initial namespace), so another boot id may
    /// well be another server with a live run.
    ///
    /// `local_store`: the store lives on this machine only (SQLite under `STATE_DIR`), so an
    /// owner recorded with this host, machine id and namespace but another boot id can only be
    /// this machine before a reboot, and every process of that boot is gone.
    pub(crate) fn sees_dead(&self, other: &Owner, local_store: bool) -> bool {
        if other.host != self.host
            || other.machine_id != self.machine_id
            || other.pid_ns != self.pid_ns
            || other.boot_id.is_empty()
            || self.boot_id.is_empty()
        {
            return false;
        }
        if other.boot_id != self.boot_id {
            // Same machine, another boot (only knowable for a store of this machine alone).
            return local_store;
        }
        if other.run_id == self.run_id {
            return false;
        }
        !process_alive(other.pid, other.start_ticks)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owner")
            .field("run_id", &self.run_id)
            .field("pid", &self.pid)
            .field("start_ticks", &self.start_ticks)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} (host {}, pid {})",
            self.run_id, self.host, self.pid
        )
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses, hence the split at the last `)`): index 0 is the state, 19 the start time.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of `pid` in clock ticks since boot, when it exists.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether process `pid`, started at `start_ticks`, is still running (not gone, not a zombie,
/// not a recycled pid). A start time of 0 means "unknown": only existence is checked.
pub fn process_alive(pid: u32, start_ticks: u64) -> bool {
    if pid == 0 {
        return false;
    }
    let Some(fields) = stat_fields(pid) else {
        return false;
    };
    if matches!(fields.first().map(String::as_str), Some("Z" | "X" | "x")) {
        return false;
    }
    if start_ticks == 0 {
        return true;
    }
    fields.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_recycled_pid_is_not() {
        let me = Owner::new_run();
        assert!(me.start_ticks() > 0, "start time read from /proc/self/stat");
        assert!(process_alive(me.pid(), me.start_ticks()));
        assert!(!process_alive(me.pid(), me.start_ticks() + 1));
        let impostor = me.sibling("other-run", me.pid(), me.start_ticks() + 1);
        assert!(me.sees_dead(&impostor, false));
        let same_process_other_run = me.sibling("other-run", me.pid(), me.start_ticks());
        assert!(!me.sees_dead(&same_process_other_run, false));
    }

    #[test]
    fn a_zombie_or_vanished_child_is_dead() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let start = process_start_ticks(pid).expect("child has a start time");
        let me = Owner::new_run();
        let owner = me.sibling("child-run", pid, start);
        assert!(!me.sees_dead(&owner, false));
        child.kill().expect("kill child");
        // Not reaped yet: the child is a zombie, which counts as dead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(pid, start) {
            assert!(std::time::Instant::now() < deadline, "child never died");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(me.sees_dead(&owner, false));
        child.wait().expect("reap child");
        assert!(me.sees_dead(&owner, false));
    }

    #[test]
    fn other_hosts_are_never_judged_but_a_reboot_is_in_a_local_store() {
        let me = Owner::new_run();
        let remote = Owner::from_parts("r", "elsewhere", "m2", "b2", me.pid_ns(), 1, 1);
        assert!(!me.sees_dead(&remote, false));
        assert!(!me.sees_dead(&remote, true));
        let previous_boot = Owner::from_parts(
            "old",
            me.host(),
            me.machine_id(),
            "previous-boot-id",
            me.pid_ns(),
            me.pid(),
            me.start_ticks(),
        );
        assert!(me.sees_dead(&previous_boot, true));
        // In a shared store the same host name, machine id and namespace link may be another
        // server (a cloned VM, a container): its run is alive until its lease runs out.
        assert!(!me.sees_dead(&previous_boot, false));
    }
}
