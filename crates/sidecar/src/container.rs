//! What the process needs from the container it runs in: its CPU budget from the cgroup's
//! CPU quota (so the runtime sizes itself to the pod's limit, not to the node's cores), and
//! the loopback HTTP probe behind `tollgate health` and `tollgate ready`, so Kubernetes
//! probes need no curl or shell in the image. Reads `/proc` and `/sys` and opens loopback
//! sockets only; never touches snapshots or decisions.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// A CPU quota: `quota` microseconds of CPU time every `period` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuQuota {
    /// Whole CPUs the quota allows, rounded up (1.5 CPUs gets 2 threads), at least 1.
    pub fn cpus(&self) -> usize {
        if self.period_us == 0 {
            return 1;
        }
        usize::try_from(self.quota_us.div_ceil(self.period_us)).unwrap_or(usize::MAX).max(1)
    }
}

/// Parses cgroup v2 `cpu.max`: `"max 100000"` (no quota) or `"150000 100000"`.
pub fn parse_cpu_max(text: &str) -> Option<CpuQuota> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period_us = fields.next().map_or(Some(100_000), |period| period.parse().ok())?;
    if quota == "max" {
        return None;
    }
    let quota_us = quota.parse().ok().filter(|&quota: &u64| quota > 0)?;
    Some(CpuQuota { quota_us, period_us })
}

/// Parses cgroup v1 `cpu.cfs_quota_us` (`-1` for no quota) and `cpu.cfs_period_us`.
pub fn parse_cfs(quota: &str, period: &str) -> Option<CpuQuota> {
    let quota_us: i64 = quota.trim().parse().ok()?;
    let period_us: u64 = period.trim().parse().ok()?;
    (quota_us > 0 && period_us > 0).then_some(CpuQuota { quota_us: quota_us.unsigned_abs(), period_us })
}

/// The cgroup v2 path of this process from `/proc/self/cgroup` (the `0::/path` line).
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The CPU quota of this process's cgroup under `root` (normally `/sys/fs/cgroup`): cgroup v2
/// `cpu.max` in the process's own cgroup, then at the root (inside a container's cgroup
/// namespace the root is the container's cgroup), then the cgroup v1 CFS files.
pub fn cpu_quota(root: &Path, proc_self_cgroup: Option<&str>) -> Option<CpuQuota> {
    let read = |path: &Path| std::fs::read_to_string(path).ok();
    let own = proc_self_cgroup.and_then(cgroup_v2_path).map(|path| root.join(path.trim_start_matches('/')).join("cpu.max"));
    for candidate in own.into_iter().chain([root.join("cpu.max")]) {
        if let Some(text) = read(&candidate) {
            return parse_cpu_max(&text);
        }
    }
    for dir in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
        let dir = root.join(dir);
        if let (Some(quota), Some(period)) = (read(&dir.join("cpu.cfs_quota_us")), read(&dir.join("cpu.cfs_period_us"))) {
            return parse_cfs(&quota, &period);
        }
    }
    None
}

/// Worker threads for the async runtime: the cgroup CPU quota in whole CPUs when there is one,
/// never more than the CPUs the process may run on (its affinity mask), at least 1.
pub fn worker_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let proc_self_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
    match cpu_quota(Path::new("/sys/fs/cgroup"), proc_self_cgroup.as_deref()) {
        Some(quota) => quota.cpus().min(available),
        None => available,
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("`{0}` is not an address like 127.0.0.1:8181")]
    Address(String),
    #[error("cannot connect to `{addr}`")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("no answer from `{addr}`")]
    Exchange { addr: SocketAddr, source: std::io::Error },
    #[error("`{addr}` answered `{status_line}` on `{path}`")]
    Status { addr: SocketAddr, path: String, status_line: String },
}

/// GETs `path` from `addr` over a plain HTTP/1.1 connection and succeeds on a 2xx status.
/// Small on purpose: the probe runs every few seconds in every pod.
pub fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let socket_addr =
        addr.to_socket_addrs().ok().and_then(|mut addrs| addrs.next()).ok_or_else(|| ProbeError::Address(addr.to_string()))?;
    let mut stream =
        TcpStream::connect_timeout(&socket_addr, timeout).map_err(|source| ProbeError::Connect { addr: socket_addr, source })?;
    let exchange = |stream: &mut TcpStream| -> std::io::Result<String> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tollgate-probe\r\nConnection: close\r\n\r\n")?;
        // The status line is all a probe needs; it arrives in the first read in practice, and
        // a short loop covers the rest.
        let mut head = Vec::with_capacity(128);
        let mut buffer = [0u8; 128];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n_read = stream.read(&mut buffer)?;
            if n_read == 0 {
                break;
            }
            head.extend_from_slice(buffer.get(..n_read).unwrap_or_default());
        }
        let text = String::from_utf8_lossy(&head);
        Ok(text.lines().next().unwrap_or_default().trim().to_string())
    };
    let status_line = exchange(&mut stream).map_err(|source| ProbeError::Exchange { addr: socket_addr, source })?;
    let status = status_line.split_whitespace().nth(1).and_then(|code| code.parse::<u16>().ok());
    if status.is_some_and(|status| (200..300).contains(&status)) {
        Ok(())
    } else {
        Err(ProbeError::Status { addr: socket_addr, path: path.to_string(), status_line })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_gives_whole_cpus_rounded_up() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n").map(|quota| quota.cpus()), Some(2));
        assert_eq!(parse_cpu_max("100000 100000").map(|quota| quota.cpus()), Some(1));
        assert_eq!(parse_cpu_max("25000 100000").map(|quota| quota.cpus()), Some(1), "a quarter CPU still needs one thread");
        assert_eq!(parse_cpu_max("400000 100000").map(|quota| quota.cpus()), Some(4));
        assert_eq!(parse_cpu_max("garbage"), None);
    }

    #[test]
    fn cgroup_v1_quota() {
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n").map(|quota| quota.cpus()), Some(2));
    }

    #[test]
    fn reads_the_own_cgroup_then_the_root_then_v1() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/pod1");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("cpu.max"), "300000 100000\n").unwrap();
        std::fs::write(root.path().join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cpu_quota(root.path(), Some("0::/kubepods/pod1\n")).map(|quota| quota.cpus()), Some(3));
        assert_eq!(cpu_quota(root.path(), Some("0::/\n")), None);

        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("cpu,cpuacct")).unwrap();
        std::fs::write(v1.path().join("cpu,cpuacct/cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(v1.path().join("cpu,cpuacct/cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cpu_quota(v1.path(), None).map(|quota| quota.cpus()), Some(1));
    }
}
