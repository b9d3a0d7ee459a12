//! Builds `csrc/fake_nvml.c` into a shared library, the stand-in for
//! `libnvidia-ml.so.1` that the GPU tests point the observer at (no GPU on
//! CI). Its path reaches the tests as `FAKE_NVML_LIB`.
use std::{env, path::PathBuf};

fn main() {
    let src = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("csrc/fake_nvml.c");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("libfake-nvml.so");
    println!("cargo:rerun-if-changed={}", src.display());
    // cc finds the C compiler the same way for every target; it builds static
    // archives only, so the shared object is linked with its compiler directly.
    let compiler = cc::Build::new().get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-ldl", "-lpthread"]);
    let status = cmd.status().unwrap_or_else(|e| panic!("running the C compiler {:?}: {e}", compiler.path()));
    assert!(status.success(), "compiling {} failed: {cmd:?}", src.display());
    println!("cargo:rustc-env=FAKE_NVML_LIB={}", out.display());
}
