//! The TCP connections this process holds, read from `/proc` (Linux): to check that what was
//! shut down let go of its connections.

/// How many established TCP connections this process holds to port `port` (any address).
pub fn established_to(port: u16) -> std::io::Result<usize> {
    let mine: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    let mut n = 0;
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else { continue };
            let port_of = remote.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let established = *state == "01";
            if established && port_of == Some(port) && inode.parse().is_ok_and(|i: u64| mine.contains(&i)) {
                n += 1;
            }
        }
    }
    Ok(n)
}
