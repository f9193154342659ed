//! Reads another process's memory and CPU time from /proc, for the report's RSS and
//! CPU-per-request figures. Linux only; a missing process reads as `None`.

use std::path::PathBuf;

/// Resident and peak-resident memory in KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Memory {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

fn proc_path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(proc_path(pid, "status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(Memory { rss_kb: field("VmRSS:")?, hwm_kb: field("VmHWM:")? })
}

/// Clock ticks per second for /proc/PID/stat times; 100 on every Linux this runs on, but
/// ask `getconf` rather than assume.
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// User plus system CPU time in clock ticks, from `/proc/PID/stat` fields 14 and 15.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing paren don't.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field 14 is index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The process listening on TCP `port` (IPv4 or IPv6), found through the socket inode in
/// `/proc/net/tcp*` and the open files of each process. `None` when there is none, or when
/// permissions hide it.
pub fn listener_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            // 0A is LISTEN.
            (local_port == port && *state == "0A").then(|| fields.get(9).map(|inode| inode.to_string())).flatten()
        })
    })?;
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
        fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.to_str() == Some(wanted.as_str()))).then_some(pid)
    })
}
