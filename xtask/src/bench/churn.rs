//! The footprint's loads (footprint.rs): short TCP connections, and short UDP
//! socket pairs beside many open UDP flows, each paced to a number of closed
//! sessions per second (as far as this machine gets).

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

/// Client threads of either load.
const CLIENTS: usize = 2;
/// Open UDP flows kept through the UDP load: an unconnected socket's flows
/// with as many peers, as a server answering many clients has. The observer
/// must not pay per open flow at each release (it once copied the whole flow
/// table for every released socket).
pub const UDP_OPEN_FLOWS: u16 = 10_000;
/// Where those flows' datagrams go: a loopback address nothing here binds
/// (the loads bind 127.0.0.1), so the kernel drops them as having no socket.
const UDP_OPEN_FLOWS_TO: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const UDP_OPEN_FLOWS_FIRST_PORT: u16 = 20_000;
/// Payload of each UDP datagram of the load.
const DATAGRAM: [u8; 64] = [7; 64];

/// Short TCP connections for `length` at `sessions_per_sec` (each connection
/// is two sessions on loopback, client and server socket); the number of
/// connections made. Clients close with a reset (SO_LINGER 0), so no
/// TIME_WAIT socket holds an ephemeral port and the churn can go on at any rate.
pub fn tcp(length: Duration, sessions_per_sec: f64) -> Result<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the churn listener")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        // Borrowed, not moved: the listener must outlive the clients, or one whose
        // last connect races the acceptor's exit is refused.
        let acceptor = scope.spawn(|| accept_until(&listener, &stop));
        let made = clients(length, sessions_per_sec / 2.0, &stop, || {
            let stream = TcpStream::connect(addr).context("churn connection")?;
            reset_on_close(&stream)
        });
        let accepted = acceptor.join().map_err(|_| anyhow::anyhow!("the churn acceptor panicked"))?;
        accepted.and(made)
    })
}

/// Short UDP exchanges for `length` at `sessions_per_sec`, beside
/// [`UDP_OPEN_FLOWS`] open flows: each exchange is two connected sockets on
/// loopback (two sessions) that trade one datagram each way and close, their
/// releases ending both sessions. The number of exchanges made.
pub fn udp(length: Duration, sessions_per_sec: f64) -> Result<u64> {
    let open = UdpSocket::bind("127.0.0.1:0").context("binding the open flows' socket")?;
    for i in 0..UDP_OPEN_FLOWS {
        open.send_to(&DATAGRAM, (UDP_OPEN_FLOWS_TO, UDP_OPEN_FLOWS_FIRST_PORT + i))
            .context("a datagram of the open flows")?;
    }
    let stop = AtomicBool::new(false);
    let made = clients(length, sessions_per_sec / 2.0, &stop, udp_exchange);
    // Held to here: its flows stay open through the load.
    drop(open);
    made
}

fn udp_exchange() -> Result<()> {
    let bind = || UdpSocket::bind("127.0.0.1:0").context("binding a churn socket");
    let (a, b) = (bind()?, bind()?);
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    let mut buf = [0u8; 128];
    for (from, to) in [(&a, &b), (&b, &a)] {
        to.set_read_timeout(Some(Duration::from_secs(1)))?;
        from.send(&DATAGRAM).context("sending a churn datagram")?;
        let n = to.recv(&mut buf).context("receiving a churn datagram")?;
        ensure!(n == DATAGRAM.len(), "a churn datagram of {n} bytes, not {}", DATAGRAM.len());
    }
    Ok(())
}

/// [`CLIENTS`] threads doing `one` for `length`, together `per_sec` times a
/// second; how many they did. Raises `stop` when done.
fn clients(length: Duration, per_sec: f64, stop: &AtomicBool, one: impl Fn() -> Result<()> + Sync) -> Result<u64> {
    let made = AtomicU64::new(0);
    let per_client = per_sec / CLIENTS as f64;
    let (made_ref, one) = (&made, &one);
    thread::scope(|scope| {
        let handles: Vec<_> =
            (0..CLIENTS).map(|_| scope.spawn(move || paced(per_client, stop, made_ref, one))).collect();
        thread::sleep(length);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a churn client panicked"))??;
        }
        Ok(made.load(Ordering::Relaxed))
    })
}

/// Does `one` until `stop`, `per_sec` times a second at most, counting each in `made`.
fn paced(per_sec: f64, stop: &AtomicBool, made: &AtomicU64, one: impl Fn() -> Result<()>) -> Result<()> {
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        one()?;
        n += 1;
        made.fetch_add(1, Ordering::Relaxed);
        let due = started + Duration::from_secs_f64(n as f64 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    Ok(())
}

fn accept_until(listener: &TcpListener, stop: &AtomicBool) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            // Dropped at once: the server socket closes when the client's reset arrives.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_micros(200)),
            // Reset by the client before it was accepted: the normal case here.
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) => {}
            Err(e) => return Err(e).context("accepting a churn connection"),
        }
    }
    Ok(())
}

fn reset_on_close(stream: &TcpStream) -> Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).context("SO_LINGER 0 on a churn connection")
}
