//! Booting one guest: the qemu command line (pure, unit-tested) and running
//! it bounded in time, with the serial console kept in a log file and the
//! guest's progress lines echoed with the kernel's name.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::initramfs::{MARK, ROOT_TAG, WORK_TAG};
use crate::build::Arch;

/// One VM.
pub struct Vm<'a> {
    /// The guest's architecture: qemu-system-x86_64, or qemu-system-aarch64's `virt` machine.
    pub arch: Arch,
    /// Host directory shared read-only as the guest's root (mount tag `hostroot`): the
    /// host's `/`, or an unpacked root of the guest's architecture (`rootfs`).
    pub root: &'a Path,
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    /// Host directory shared writable (mount tag `work`).
    pub work: &'a Path,
    pub memory_mb: u32,
    /// Virtual CPUs (`-smp`).
    pub vcpus: u32,
    pub timeout: Duration,
    /// Where qemu writes its pid, so a failed run can be cleaned up.
    pub pidfile: &'a Path,
}

/// qemu's option syntax doubles commas inside values.
pub fn escape(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// `timeout` and qemu's arguments.
pub fn command_line(vm: &Vm) -> Vec<OsString> {
    let s = |x: &str| OsString::from(x);
    let mut a = vec![
        // --foreground: qemu stays in our process group, so ^C reaches it; -k:
        // a guest that ignores the TERM is killed 10 s later.
        s("--foreground"),
        s("-k"),
        s("10"),
        s(&vm.timeout.as_secs().to_string()),
    ];
    a.extend(machine(vm.arch).into_iter().map(OsString::from));
    a.extend([
        // /dev/kvm here is a paravirtual backend that cannot run a stock kernel:
        // software emulation, one vCPU unless asked for more (two VMs share
        // the host's two cores); several run on as many host threads (MTTCG).
        s("-accel"),
        s("tcg"),
        s("-smp"),
        s(&vm.vcpus.to_string()),
        s("-m"),
        s(&vm.memory_mb.to_string()),
        // No default devices: no NIC, so the guest has no network beyond its own lo.
        s("-nodefaults"),
        s("-no-user-config"),
        s("-no-reboot"),
        s("-display"),
        s("none"),
        s("-serial"),
        s("stdio"),
        s("-pidfile"),
        vm.pidfile.into(),
        s("-kernel"),
        vm.vmlinux.into(),
        s("-initrd"),
        vm.initramfs.into(),
        // panic=-1 with -no-reboot: a guest panic ends qemu at once. No CPU
        // vulnerability mitigations: retpolines and RSB filling only slow the
        // emulation down in a throwaway VM.
        s("-append"),
        s(&format!("console={} panic=-1 oops=panic quiet mitigations=off", console(vm.arch))),
        s("-fsdev"),
        s(&format!("local,id={ROOT_TAG},path={},security_model=none,readonly=on", escape(vm.root))),
        s("-device"),
        s(&format!("virtio-9p-pci,fsdev={ROOT_TAG},mount_tag={ROOT_TAG}")),
        s("-fsdev"),
        s(&format!("local,id={WORK_TAG},path={},security_model=none", escape(vm.work))),
        s("-device"),
        s(&format!("virtio-9p-pci,fsdev={WORK_TAG},mount_tag={WORK_TAG}")),
    ]);
    a
}

/// qemu's program, machine and CPU for `arch`. arm64: the generic `virt` board (PCI for
/// the virtio-9p devices, a PL011 serial port); `-cpu max` as on x86, with the
/// implementation-defined pointer-authentication algorithm, which TCG computes far
/// faster than the architected QARMA (every kernel function return signs and checks).
fn machine(arch: Arch) -> Vec<&'static str> {
    match arch {
        Arch::X86_64 => vec!["qemu-system-x86_64", "-cpu", "max"],
        Arch::Aarch64 => vec!["qemu-system-aarch64", "-machine", "virt", "-cpu", "max,pauth-impdef=on"],
    }
}

/// The serial console's device name in the guest.
fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The qemu program for `arch` (for messages and the host's tool check).
pub fn program(arch: Arch) -> &'static str {
    machine(arch)[0]
}

/// How a VM run ended, as the host saw it.
pub struct Ended {
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Kills the VM if the run is abandoned (an error, a panic in xtask).
struct Guard {
    child: Child,
    pidfile: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = std::fs::read_to_string(&self.pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on the pid qemu wrote for this run.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `vm`, console to `console`, echoing the guest's progress lines as
/// `[label] ...`. Returns when qemu exits; past the timeout (plus a margin
/// for `timeout` itself) it is killed here too.
pub fn run(vm: &Vm, console: &Path, label: &str) -> Result<Ended> {
    let _ = std::fs::remove_file(vm.pidfile);
    let log = File::create(console).with_context(|| format!("creating {}", console.display()))?;
    let mut cmd = Command::new("timeout");
    cmd.args(command_line(vm)).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {} under timeout", program(vm.arch)))?;
    let mut guard = Guard { child, pidfile: vm.pidfile.to_owned() };
    let mut reader = File::open(console)?;
    let mut pending = String::new();
    let hard_limit = vm.timeout + Duration::from_secs(30);
    let status = loop {
        echo_progress(&mut reader, &mut pending, label)?;
        if let Some(st) = guard.child.try_wait()? {
            break Some(st);
        }
        if started.elapsed() > hard_limit {
            break None; // the guard kills it
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    echo_progress(&mut reader, &mut pending, label)?;
    let timed_out = match status {
        // timeout(1) exits 124 when it had to stop the command.
        Some(st) => matches!(st.code(), Some(124 | 137)),
        None => true,
    };
    drop(guard);
    Ok(Ended { timed_out, elapsed: started.elapsed() })
}

/// Prints the complete new lines of the console that the guest marked.
fn echo_progress(reader: &mut File, pending: &mut String, label: &str) -> Result<()> {
    let mut buf = Vec::new();
    reader.read_to_end(&mut buf)?;
    pending.push_str(&String::from_utf8_lossy(&buf));
    while let Some(nl) = pending.find('\n') {
        let line: String = pending.drain(..=nl).collect();
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix(MARK) {
            eprintln!("[{label}]{rest}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_boots_the_kernel_with_both_shares_and_no_network() {
        let vm = Vm {
            arch: Arch::X86_64,
            root: Path::new("/"),
            vmlinux: Path::new("/k/vmlinux"),
            initramfs: Path::new("/k/initramfs.cpio"),
            work: Path::new("/t/runs/6,1"),
            memory_mb: 2048,
            vcpus: 1,
            timeout: Duration::from_secs(900),
            pidfile: Path::new("/t/runs/6.1.pid"),
        };
        let a: Vec<String> = command_line(&vm).iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let joined = a.join(" ");
        assert!(
            joined.starts_with(
                "--foreground -k 10 900 qemu-system-x86_64 -cpu max -accel tcg -smp 1 -m 2048 -nodefaults"
            ),
            "{joined}"
        );
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-kernel /k/vmlinux -initrd /k/initramfs.cpio -append console=ttyS0 panic=-1"));
        assert!(a.contains(&"local,id=hostroot,path=/,security_model=none,readonly=on".to_owned()));
        assert!(a.contains(&"local,id=work,path=/t/runs/6,,1,security_model=none".to_owned()), "{a:?}");
        assert!(a.contains(&"virtio-9p-pci,fsdev=work,mount_tag=work".to_owned()));
        assert!(!joined.contains("-nic") && !joined.contains("-netdev"));

        let arm = Vm { arch: Arch::Aarch64, root: Path::new("/t/kernels/rootfs-arm64/root"), ..vm };
        let a: Vec<String> = command_line(&arm).iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let joined = a.join(" ");
        assert!(
            joined.starts_with(
                "--foreground -k 10 900 qemu-system-aarch64 -machine virt -cpu max,pauth-impdef=on -accel tcg -smp 1"
            ),
            "{joined}"
        );
        assert!(joined.contains("-append console=ttyAMA0 panic=-1"), "{joined}");
        assert!(a.contains(
            &"local,id=hostroot,path=/t/kernels/rootfs-arm64/root,security_model=none,readonly=on".to_owned()
        ));
    }

    #[test]
    fn progress_lines_are_the_marked_ones() {
        let dir = std::env::temp_dir().join(format!("xtask-qemu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        std::fs::write(&path, "[ 0.1] boot\r\nobserver-vm: booted\r\nobserver-vm: tier au").unwrap();
        let mut reader = File::open(&path).unwrap();
        let mut pending = String::new();
        echo_progress(&mut reader, &mut pending, "6.1").unwrap();
        assert_eq!(pending, "observer-vm: tier au", "an incomplete line waits");
        std::fs::write(&path, "[ 0.1] boot\r\nobserver-vm: booted\r\nobserver-vm: tier auto: check\r\n").unwrap();
        echo_progress(&mut reader, &mut pending, "6.1").unwrap();
        assert!(pending.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
