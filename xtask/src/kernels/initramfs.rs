//! The guest's initramfs: static busybox, the 9p modules and an `/init` that
//! mounts the host's root read-only over virtio-9p, gives it the writable and
//! virtual filesystems the tests need, chroots into it and runs the guest
//! script (see `guest`), then prints its exit status on the console and
//! powers off.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};

use super::cpio::Entry;

/// Printed by the guest at the start of every line the host looks for.
pub const MARK: &str = "observer-vm:";

/// 9p mount tags, matching the qemu command line (`qemu`).
pub const ROOT_TAG: &str = "hostroot";
pub const WORK_TAG: &str = "work";

/// Single-quotes `s` for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/init`. `modules` in load order; `work` is where the writable share is
/// mounted inside the host root (the host's own path to it, so paths agree on
/// both sides); `script` is run there with the host root's /bin/sh.
pub fn init_script(modules: &[String], work: &Path, script: &Path) -> String {
    // A checkout under a directory the guest covers with a fresh tmpfs (a CI
    // job's clone in /tmp) would vanish under it, binaries, work directory
    // and all: its top directory is set aside before and bound back after.
    let (keep, restore) = match kept_under_tmpfs(work) {
        Some(kept) => {
            let kept = sh_quote(&kept.to_string_lossy());
            (
                format!("mkdir -p /keep && mount -o bind $R{kept} /keep || die \"keeping {kept}\"\n"),
                format!("mkdir -p $R{kept} && mount -o bind /keep $R{kept} || die \"restoring {kept}\"\n"),
            )
        }
        None => (String::new(), String::new()),
    };
    let work = sh_quote(&work.to_string_lossy());
    let script = sh_quote(&script.to_string_lossy());
    let mut s = format!(
        r#"#!/bin/sh
# /init of the initramfs built by `cargo xtask kernels` (xtask/src/kernels/initramfs.rs).
/bin/busybox --install -s /bin
export PATH=/bin
say() {{ echo "{MARK} $*"; }}
# Any set-up failure ends the run with a status the host reports as such.
die() {{ say "init: $*"; sync; say "exit 125"; poweroff -f; }}
mount -t proc proc /proc || die "mounting /proc"
mount -t sysfs sysfs /sys || die "mounting /sys"
mount -t devtmpfs devtmpfs /dev || die "mounting /dev"
"#
    );
    for m in modules {
        s.push_str(&format!("insmod /lib/modules/{m}.ko || die \"loading module {m}\"\n"));
    }
    let (always, if_dir) = (TMPFS_ALWAYS.join(" "), TMPFS_IF_DIR.join(" "));
    s.push_str(&format!(
        r#"R=/newroot
# The host's root, read-only; cached because nothing changes it while the VM runs.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro {ROOT_TAG} $R || die "mounting the host root over 9p"
mount -t proc proc $R/proc || die "mounting proc"
mount -t sysfs sysfs $R/sys || die "mounting sysfs"
mount -t devtmpfs devtmpfs $R/dev || die "mounting devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts || die "mounting devpts"
mount -t tracefs tracefs $R/sys/kernel/tracing || die "mounting tracefs"
mount -t bpf bpf $R/sys/fs/bpf || die "mounting bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "mounting cgroup2"
# Writable places the tests and their tools use: temp dirs, ip netns (/run/netns).
{keep}for d in {always}; do mount -t tmpfs tmpfs $R$d || die "mounting tmpfs on $d"; done
for d in {if_dir}; do
  [ -L $R$d ] || [ ! -d $R$d ] || mount -t tmpfs tmpfs $R$d || die "mounting tmpfs on $d"
done
{restore}# Results go here; not cached, so the host sees every write.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {WORK_TAG} $R{work} || die "mounting the work directory over 9p"
ip link set lo up || die "bringing lo up"
say "booted $(uname -r)"
chroot $R /bin/sh {script}
rc=$?
sync
say "exit $rc"
poweroff -f
"#
    ));
    s
}

/// Directories the guest mounts a fresh tmpfs on (`init_script`): always,
/// and where the host has them as real directories (not links into /run).
const TMPFS_ALWAYS: [&str; 3] = ["/tmp", "/run", "/dev/shm"];
const TMPFS_IF_DIR: [&str; 3] = ["/var/run", "/var/tmp", "/var/lock"];

/// The top directory below one of the tmpfs directories that holds `work`, if any
/// (`/tmp/ci/target/kernels/runs/6.1` -> `/tmp/ci`).
fn kept_under_tmpfs(work: &Path) -> Option<PathBuf> {
    TMPFS_ALWAYS.iter().chain(&TMPFS_IF_DIR).find_map(|d| {
        let first = work.strip_prefix(d).ok()?.components().next()?;
        Some(Path::new(d).join(first))
    })
}

/// True when `elf` is an ELF64 file without a program interpreter, i.e.
/// runs without a dynamic loader (which the initramfs does not have).
pub fn is_static_elf(elf: &[u8]) -> bool {
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF") || elf[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        // PT_INTERP = 3; a truncated table counts as not static.
        elf.get(at..at + 4).is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// Every member of the archive.
pub fn entries(busybox: Vec<u8>, modules: Vec<(String, Vec<u8>)>, init: String) -> Result<Vec<Entry>> {
    ensure!(
        is_static_elf(&busybox),
        "busybox is not a static executable: install busybox-static (the initramfs has no C library)"
    );
    let dir = |p: &str| Entry::Dir { path: p.into() };
    let mut e = vec![
        dir("bin"),
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("newroot"),
        dir("lib"),
        dir("lib/modules"),
        // The kernel opens /dev/console for init before anything is mounted.
        Entry::CharDev { path: "dev/console".into(), mode: 0o600, major: 5, minor: 1 },
        Entry::CharDev { path: "dev/null".into(), mode: 0o666, major: 1, minor: 3 },
        Entry::File { path: "bin/busybox".into(), mode: 0o755, data: busybox },
        Entry::Symlink { path: "bin/sh".into(), target: "busybox".into() },
    ];
    for (name, data) in modules {
        e.push(Entry::File { path: format!("lib/modules/{name}.ko"), mode: 0o644, data });
    }
    e.push(Entry::File { path: "init".into(), mode: 0o755, data: init.into_bytes() });
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(interp: bool) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 2 * 56];
        e[..5].copy_from_slice(b"\x7fELF\x02");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        e[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[120..124].copy_from_slice(&(if interp { 3u32 } else { 1 }).to_le_bytes());
        e
    }

    #[test]
    fn static_executables_are_told_apart() {
        assert!(is_static_elf(&elf(false)));
        assert!(!is_static_elf(&elf(true)));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let mut truncated = elf(false);
        truncated.truncate(100);
        assert!(!is_static_elf(&truncated));
    }

    #[test]
    fn archive_lists_busybox_modules_in_order_and_init_last() {
        let mods = vec![("netfs".to_owned(), b"a".to_vec()), ("9p".to_owned(), b"b".to_vec())];
        let e = entries(elf(false), mods, "#!/bin/sh\n".into()).unwrap();
        let paths: Vec<&str> = e
            .iter()
            .map(|e| match e {
                Entry::Dir { path }
                | Entry::File { path, .. }
                | Entry::Symlink { path, .. }
                | Entry::CharDev { path, .. } => path.as_str(),
            })
            .collect();
        assert_eq!(
            paths,
            [
                "bin",
                "dev",
                "proc",
                "sys",
                "newroot",
                "lib",
                "lib/modules",
                "dev/console",
                "dev/null",
                "bin/busybox",
                "bin/sh",
                "lib/modules/netfs.ko",
                "lib/modules/9p.ko",
                "init"
            ]
        );
        assert!(entries(elf(true), Vec::new(), String::new()).unwrap_err().to_string().contains("busybox-static"));
    }

    #[test]
    fn init_loads_modules_in_order_mounts_and_reports_the_exit_status() {
        let s = init_script(
            &["netfs".into(), "9pnet".into()],
            Path::new("/work/main/target/kernels/runs/6.1"),
            Path::new("/work/main/target/kernels/runs/6.1/guest.sh"),
        );
        let netfs = s.find("insmod /lib/modules/netfs.ko").unwrap();
        let p9 = s.find("insmod /lib/modules/9pnet.ko").unwrap();
        let root = s.find("hostroot $R ").unwrap();
        assert!(netfs < p9 && p9 < root);
        for fs in [
            "tracefs tracefs $R/sys/kernel/tracing",
            "bpf bpf $R/sys/fs/bpf",
            "cgroup2 cgroup2 $R/sys/fs/cgroup",
            "devtmpfs devtmpfs $R/dev",
        ] {
            assert!(s.contains(&format!("mount -t {fs} ||")), "{fs}");
        }
        assert!(s.contains("work $R'/work/main/target/kernels/runs/6.1' ||"));
        assert!(s.contains("chroot $R /bin/sh '/work/main/target/kernels/runs/6.1/guest.sh'\nrc=$?"));
        assert!(s.contains(r#"say "exit $rc""#));
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert!(!s.contains("/keep"), "nothing to keep outside the tmpfs dirs");
    }

    #[test]
    fn a_checkout_under_tmp_is_kept_visible_over_the_guests_tmpfs() {
        let s = init_script(&[], Path::new("/tmp/ci/target/kernels/runs/6.1"), Path::new("/tmp/ci/g.sh"));
        let keep = s.find("mount -o bind $R'/tmp/ci' /keep").unwrap();
        let tmpfs = s.find("mount -t tmpfs tmpfs $R$d").unwrap();
        let restore = s.find("mkdir -p $R'/tmp/ci' && mount -o bind /keep $R'/tmp/ci'").unwrap();
        let work = s.find("work $R'/tmp/ci/target/kernels/runs/6.1'").unwrap();
        assert!(keep < tmpfs && tmpfs < restore && restore < work, "{s}");
        assert_eq!(kept_under_tmpfs(Path::new("/var/tmp/x/y")), Some(PathBuf::from("/var/tmp/x")));
        assert_eq!(kept_under_tmpfs(Path::new("/tmpfoo/x")), None, "a prefix of a name is not a parent");
    }
}
