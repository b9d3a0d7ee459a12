//! `--iface` names to interface indexes in the observer's network namespace.
use std::{ffi::CString, fs, os::unix::fs::MetadataExt};

use crate::session::IfaceFilter;

/// Resolves the selected names; `Err` lists the interfaces that do exist.
pub fn resolve(names: &[String]) -> Result<IfaceFilter, String> {
    if names.is_empty() {
        return Ok(IfaceFilter::all());
    }
    let mut indexes = Vec::new();
    for name in names {
        match index_of(name) {
            Some(i) => indexes.push(i),
            None => {
                return Err(format!(
                    "no network interface named `{name}` in this network namespace; interfaces here: {}",
                    existing().join(", ")
                ));
            }
        }
    }
    let netns = fs::metadata("/proc/self/ns/net")
        .map_err(|e| format!("cannot read this process's network namespace (/proc/self/ns/net): {e}"))?
        .ino();
    let netns = u32::try_from(netns).map_err(|_| format!("network namespace inode {netns} does not fit 32 bits"))?;
    Ok(IfaceFilter::only(netns, indexes))
}

pub fn index_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Interface names of this network namespace, sorted. Asks the kernel rather
/// than reading /sys/class/net, which shows the namespace /sys was mounted in.
pub fn existing() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, which
    // is read before being freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolves_and_unknown_names_list_what_exists() {
        assert!(resolve(&["lo".into()]).is_ok());
        let err = resolve(&["lo".into(), "nosuchif0".into()]).unwrap_err();
        assert!(err.starts_with("no network interface named `nosuchif0`"), "{err}");
        assert!(err.contains("lo"), "{err}");
        assert!(resolve(&["bad\0name".into()]).is_err());
    }
}
