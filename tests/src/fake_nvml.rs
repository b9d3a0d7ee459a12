//! A private copy of the fake NVML library (`tests/csrc/fake_nvml.c`, built
//! by build.rs) and its configuration file, which the test rewrites while
//! the observer runs (see the C file's header for the keys).
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{NetNs, ObserverProcess, TempDir};

pub struct FakeNvml {
    dir: TempDir,
    /// The library to give `--nvml-lib`.
    pub lib: PathBuf,
}

impl FakeNvml {
    pub fn new(tag: &str, conf: &str) -> Self {
        let dir = TempDir::new(tag).unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        fs::copy(env!("FAKE_NVML_LIB"), &lib).unwrap();
        fs::create_dir_all(dir.path().join("pods")).unwrap();
        let fake = FakeNvml { dir, lib };
        fake.set(conf);
        fake
    }

    /// Replaces the configuration atomically (the fake re-reads it when its
    /// inode changes, and never sees half a file).
    pub fn set(&self, conf: &str) {
        let tmp = self.dir.path().join("fake-nvml.conf.new");
        fs::write(&tmp, conf).unwrap();
        fs::rename(&tmp, self.dir.path().join("fake-nvml.conf")).unwrap();
    }

    /// A file in this fake's directory (markers, block files, `pods/`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The arguments of `observer run` for this library, sampling every
    /// `interval` (e.g. "100ms"), with an empty pod log directory of its own.
    pub fn args(&self, interval: &str) -> Vec<String> {
        let lib = self.lib.to_str().unwrap();
        let pods = self.path("pods");
        ["--gpu-interval", interval, "--nvml-lib", lib, "--pod-log-dir", pods.to_str().unwrap()]
            .map(String::from)
            .to_vec()
    }

    /// `observer run --iface lo` with this library, sampling every 100 ms.
    pub fn start(&self, ns: &NetNs, extra: &[&str]) -> ObserverProcess {
        let own = self.args("100ms");
        let mut args = vec!["--iface", "lo"];
        args.extend(own.iter().map(String::as_str));
        args.extend_from_slice(extra);
        ObserverProcess::start(ns, &args).unwrap()
    }
}
