//! Reading iperf3's JSON report (`iperf3 -c ... -J`), TCP and UDP.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The receiver-side throughput of a finished client run, in bits per second.
///
/// Receiver-side, because the sender's figure counts bytes still queued in socket
/// buffers when the test ends.
pub fn received_bps(json: &str) -> Result<f64> {
    let report = parse(json)?;
    let bps = report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 -J output has no end.sum_received.bits_per_second")?;
    ensure!(bps.is_finite() && bps >= 0.0, "iperf3 reported a throughput of {bps} bit/s");
    Ok(bps)
}

/// The datagrams per second that the receiver got in a finished UDP client run
/// (`iperf3 -u ... -J`).
///
/// iperf3 3.12's `end.sum_received` is the server's view: `packets` is the highest
/// sequence number it saw, `lost_packets` the gaps below it, so their difference is the
/// datagrams that arrived (`bytes` / block size, the same number). `end.sum` is the
/// sender's count, which includes datagrams dropped at the receiving socket.
pub fn received_datagrams_per_sec(json: &str) -> Result<f64> {
    let report = parse(json)?;
    let field = |name: &str| {
        let path = format!("/end/sum_received/{name}");
        report
            .pointer(&path)
            .and_then(Value::as_f64)
            .with_context(|| format!("iperf3 -J output has no end.sum_received.{name}"))
    };
    let (packets, lost, seconds) = (field("packets")?, field("lost_packets")?, field("seconds")?);
    ensure!(
        packets.is_finite() && lost.is_finite() && lost >= 0.0 && packets >= lost,
        "iperf3 reported {packets} datagrams of which {lost} were lost"
    );
    ensure!(seconds.is_finite() && seconds > 0.0, "iperf3 reported a receiving time of {seconds} s");
    Ok((packets - lost) / seconds)
}

fn parse(json: &str) -> Result<Value> {
    let report: Value = serde_json::from_str(json).context("iperf3 -J output is not JSON")?;
    if let Some(err) = report.get("error").and_then(Value::as_str) {
        bail!("iperf3 reported an error: {err}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_receiver_throughput() {
        let json = r#"{
            "start": {"test_start": {"duration": 1}},
            "intervals": [],
            "end": {
                "sum_sent": {"bytes": 1, "bits_per_second": 4.2e10, "retransmits": 0},
                "sum_received": {"bytes": 1, "bits_per_second": 41234567890.5}
            }
        }"#;
        assert_eq!(received_bps(json).unwrap(), 41234567890.5);
    }

    #[test]
    fn integer_throughput_is_accepted() {
        let json = r#"{"end": {"sum_received": {"bits_per_second": 1000}}}"#;
        assert_eq!(received_bps(json).unwrap(), 1000.0);
    }

    #[test]
    fn iperf_errors_are_surfaced() {
        let json = r#"{"start": {}, "intervals": [], "end": {},
            "error": "unable to connect to server: Connection refused"}"#;
        let err = received_bps(json).unwrap_err().to_string();
        assert!(err.contains("Connection refused"), "{err}");
    }

    /// `end` of `iperf3 -c 127.0.0.1 -u -b 0 -l 1024 -t 1 -J` (iperf 3.12), streams
    /// and intervals left out.
    const UDP_SAMPLE: &str = r#"{
        "start": {"test_start": {"protocol": "UDP", "num_streams": 1, "blksize": 1024,
            "omit": 0, "duration": 1, "bytes": 0, "blocks": 0, "reverse": 0, "tos": 0,
            "target_bitrate": 0}},
        "intervals": [],
        "end": {
            "streams": [],
            "sum": {"start": 0, "end": 1.035454, "seconds": 1.035454, "bytes": 83496960,
                "bits_per_second": 650173285.2758616, "jitter_ms": 0.00287294626423683,
                "lost_packets": 61355, "packets": 81540, "lost_percent": 75.24527839097375,
                "sender": true},
            "sum_sent": {"start": 0, "end": 1.027381, "seconds": 1.027381, "bytes": 83496960,
                "bits_per_second": 650173285.2758616, "jitter_ms": 0, "lost_packets": 0,
                "packets": 81540, "lost_percent": 0, "sender": true},
            "sum_received": {"start": 0, "end": 1.035454, "seconds": 1.035454,
                "bytes": 19719168, "bits_per_second": 152351861.11599356,
                "jitter_ms": 0.00287294626423683, "lost_packets": 61355, "packets": 80612,
                "lost_percent": 75.24527839097375, "sender": false},
            "cpu_utilization_percent": {"host_total": 29.55, "host_user": 0.52,
                "host_system": 29.03, "remote_total": 10.13, "remote_user": 0,
                "remote_system": 10.13}
        }
    }"#;

    #[test]
    fn reads_received_datagrams_of_udp_run() {
        let rate = received_datagrams_per_sec(UDP_SAMPLE).unwrap();
        // 80612 - 61355 = 19257 datagrams, which is also bytes / 1024.
        assert_eq!(19_719_168 / 1024, 19_257);
        assert!((rate - 19_257.0 / 1.035454).abs() < 1e-6, "{rate}");
        // The same figure as the receiver's bits per second over 8192 bits a datagram.
        assert!((rate - 152_351_861.115_993_56 / 8192.0).abs() < 1e-3, "{rate}");
    }

    #[test]
    fn bad_udp_reports_are_errors() {
        assert!(received_datagrams_per_sec(r#"{"end": {"sum_received": {}}}"#).is_err());
        let bad = |packets, lost, seconds| {
            format!(
                r#"{{"end": {{"sum_received": {{"packets": {packets}, "lost_packets": {lost},
                    "seconds": {seconds}}}}}}}"#
            )
        };
        assert_eq!(received_datagrams_per_sec(&bad(10, 4, 2)).unwrap(), 3.0);
        assert!(received_datagrams_per_sec(&bad(10, 11, 2)).is_err());
        assert!(received_datagrams_per_sec(&bad(10, 0, 0)).is_err());
        let err = received_datagrams_per_sec(r#"{"error": "unable to connect"}"#).unwrap_err();
        assert!(err.to_string().contains("unable to connect"), "{err}");
    }

    #[test]
    fn missing_or_bad_fields_are_errors() {
        assert!(received_bps(r#"{"end": {}}"#).is_err());
        assert!(received_bps(r#"{"end": {"sum_received": {"bits_per_second": "x"}}}"#).is_err());
        assert!(received_bps(r#"{"end": {"sum_received": {"bits_per_second": -1}}}"#).is_err());
        assert!(received_bps("iperf3: error - bad").is_err());
    }
}
