//! Reading iperf3's JSON report (`iperf3 -c ... -J`).

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The receiver-side throughput of a finished client run, in bits per second.
///
/// Receiver-side, because the sender's figure counts bytes still queued in socket
/// buffers when the test ends.
pub fn received_bps(json: &str) -> Result<f64> {
    let report: Value = serde_json::from_str(json).context("iperf3 -J output is not JSON")?;
    if let Some(err) = report.get("error").and_then(Value::as_str) {
        bail!("iperf3 reported an error: {err}");
    }
    let bps = report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 -J output has no end.sum_received.bits_per_second")?;
    ensure!(
        bps.is_finite() && bps >= 0.0,
        "iperf3 reported a throughput of {bps} bit/s"
    );
    Ok(bps)
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

    #[test]
    fn missing_or_bad_fields_are_errors() {
        assert!(received_bps(r#"{"end": {}}"#).is_err());
        assert!(received_bps(r#"{"end": {"sum_received": {"bits_per_second": "x"}}}"#).is_err());
        assert!(received_bps(r#"{"end": {"sum_received": {"bits_per_second": -1}}}"#).is_err());
        assert!(received_bps("iperf3: error - bad").is_err());
    }
}
