//! SIGTERM and SIGINT: exit 0 within a second (stretched under emulation,
//! where detaching fentry programs alone takes about half a second), with
//! every program and link of ours gone from the kernel.
use std::{net::SocketAddr, time::Duration};

use observer_tests::{
    NetNs, ObserverProcess, TcpServer, kernel_programs_named, scaled, transfer, wait_no_kernel_objects,
};

fn stop_cleanly(signal: libc::c_int) {
    let ns = NetNs::new("shutdown").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    assert!(!kernel_programs_named("obs_").unwrap().is_empty(), "programs are loaded while running");
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let addr = server.addr();
    ns.run(|| transfer(addr, 100_000, 100_000, None).unwrap());
    let stopped = observer.stop_with(signal).unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", observer.log());
    assert!(stopped.elapsed < scaled(Duration::from_secs(1)), "took {:?}", stopped.elapsed);
    wait_no_kernel_objects("obs_", scaled(Duration::from_secs(2))).unwrap();
}

#[test]
fn sigterm_detaches_everything_and_exits_zero() {
    stop_cleanly(libc::SIGTERM);
}

#[test]
fn sigint_detaches_everything_and_exits_zero() {
    stop_cleanly(libc::SIGINT);
}
