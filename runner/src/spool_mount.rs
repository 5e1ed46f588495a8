//! What the spool is mounted as, said once at start: a spool on NFS is seen through each
//! host's NFS client, whose caches can hide another host's rename for a while.
//!
//! Measured with Linux clients of one export (docs/OPERATIONS.md, "The spool over NFS"):
//! with the default options a `stat` or `open` of a name another host renamed away keeps
//! working for about 28 s (the client trusts its cached lookup), while a listing is fresh
//! at once and revalidates the names after it. qslice lists before it acts and a rename
//! is decided by the server, so its takes stay single; but Mailman's own code and any
//! lookup without a listing before it see the past. `lookupcache=none` (or `actimeo=0`)
//! makes every lookup ask the server; NFSv4.1 sessions make a retried rename happen once.

use std::path::{Path, PathBuf};

/// The mount a path is on, from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpoolMount {
    /// Where it is mounted.
    pub(crate) mount_point: PathBuf,
    /// The file system type (`nfs`, `nfs4`, `ext4`...).
    pub(crate) fstype: String,
    /// The mount's options and the file system's own, comma-separated.
    pub(crate) options: String,
}

/// The mount `path` is on: the longest mount point that contains it.
pub(crate) fn mount_of(path: &Path, mountinfo: &str) -> Option<SpoolMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `36 35 98:0 /root /mnt/point rw,noatime shared:1 - nfs4 host:/export rw,vers=4.1,...`
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            let mount_options = fields.get(5)?;
            let mut rest = after.split(' ');
            let fstype = rest.next()?.to_owned();
            let super_options = rest.nth(1).unwrap_or("");
            path.starts_with(&mount_point).then(|| SpoolMount { mount_point, fstype, options: format!("{mount_options},{super_options}") })
        })
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to change about an NFS mount of the spool, if anything (None for a local file
/// system or a mount with the recommended options).
pub(crate) fn nfs_advice(mount: &SpoolMount) -> Option<String> {
    if !mount.fstype.starts_with("nfs") {
        return None;
    }
    let options: Vec<&str> = mount.options.split(',').collect();
    let has = |o: &str| options.contains(&o);
    let mut advice = Vec::new();
    let no_attribute_cache = ["acregmin=0", "acregmax=0", "acdirmin=0", "acdirmax=0"].iter().all(|o| has(o));
    if !has("lookupcache=none") && !no_attribute_cache {
        advice.push("add lookupcache=none (a lookup of a name another host renamed away keeps working for up to 30 s without it)");
    }
    let version = options.iter().find_map(|o| o.strip_prefix("vers=")).unwrap_or("");
    if version == "3" || version == "4.0" || mount.fstype == "nfs" && version.is_empty() {
        advice.push("mount with vers=4.1 or later (its sessions carry out a retransmitted rename once; NFSv3 and 4.0 may repeat it)");
    }
    (!advice.is_empty()).then(|| advice.join("; "))
}

/// Logs the spool's mount once: its type and options, and a warning with what to change
/// for an NFS mount without the recommended options.
pub(crate) fn log_spool_mount(spool: &Path) {
    let path = std::fs::canonicalize(spool).unwrap_or_else(|_| spool.to_owned());
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let Some(mount) = mount_of(&path, &table) else { return };
    match nfs_advice(&mount) {
        Some(advice) => tracing::warn!(
            spool = %path.display(),
            mount_point = %mount.mount_point.display(),
            fstype = %mount.fstype,
            options = %mount.options,
            "the spool is on NFS without the options qslice recommends: {advice} (docs/OPERATIONS.md, \"The spool over NFS\")"
        ),
        None => tracing::info!(spool = %path.display(), mount_point = %mount.mount_point.display(), fstype = %mount.fstype, options = %mount.options, "spool file system"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
40 22 0:35 / /var/spool/mail\\040queue rw,relatime shared:20 - nfs4 nfs:/export rw,vers=4.1,rsize=1048576,acregmin=3,acregmax=60,acdirmin=30,acdirmax=60,hard,proto=tcp,lookupcache=none,addr=10.0.2.2
41 22 0:36 / /srv/v3 rw,relatime shared:21 - nfs nfs:/export rw,vers=3,acregmin=0,acregmax=0,acdirmin=0,acdirmax=0,hard,nolock
42 22 0:37 / /srv/v4 rw,relatime shared:22 - nfs4 nfs:/export rw,vers=4.1,acregmin=3,acregmax=60,acdirmin=30,acdirmax=60,hard
";

    #[test]
    fn the_spool_is_on_the_longest_mount_point_that_contains_it() {
        let m = mount_of(Path::new("/var/spool/mail queue/in"), TABLE).expect("a mount");
        assert_eq!(m.mount_point, PathBuf::from("/var/spool/mail queue"));
        assert_eq!(m.fstype, "nfs4");
        assert!(m.options.contains("lookupcache=none"));
        assert_eq!(mount_of(Path::new("/var/spool/other"), TABLE).expect("root").fstype, "ext4");
    }

    #[test]
    fn nfs_without_lookupcache_none_or_before_4_1_gets_advice_and_a_local_disk_none() {
        let advice = |p: &str| nfs_advice(&mount_of(Path::new(p), TABLE).expect("a mount"));
        assert_eq!(advice("/home"), None, "ext4");
        assert_eq!(advice("/var/spool/mail queue"), None, "v4.1 with lookupcache=none");
        let v3 = advice("/srv/v3").expect("advice for v3");
        assert!(v3.contains("vers=4.1") && !v3.contains("lookupcache"), "v3 with actimeo=0: {v3}");
        let v4 = advice("/srv/v4").expect("advice for default caching");
        assert!(v4.contains("lookupcache=none") && !v4.contains("vers=4.1 or later"), "{v4}");
    }
}
