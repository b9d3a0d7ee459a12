//! Rebuild the kernel programs when the `bpf-linker` binary changes: the link step
//! depends on it, but cargo cannot see that dependency by itself.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run scripts/setup.sh"),
    }
}
