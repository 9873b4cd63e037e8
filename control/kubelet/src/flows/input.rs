//! The raw flow records the observer consumes: the dataplane's, read from
//! the kernel's flow ring buffer by the node's one
//! [`skep_dataplane::flows::FlowReader`].

use std::{path::Path, time::Duration};
use tokio::sync::mpsc;

pub use skep_dataplane::flows::{DropReason, Flow, FlowVerdict, Observation};

/// Flows queued between the kernel reader and the observer; beyond it the
/// reader waits and the kernel's ring buffer absorbs (then drops) events.
const QUEUE: usize = 4096;

/// Opens the node's flow ring buffer pinned under `pin_root` (the load
/// balancer's pin root; its datapath must be open already) and forwards
/// every flow into the returned channel, for [`super::serve`]. Call once
/// per node, inside the runtime.
pub fn kernel_flows(
    pin_root: &Path,
) -> Result<mpsc::Receiver<Flow>, skep_dataplane::DataplaneError> {
    let mut reader = skep_dataplane::flows::FlowReader::open(pin_root)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                next = reader.next() => match next {
                    Ok(flow) => {
                        backoff = Duration::from_millis(100);
                        if tx.send(flow).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "reading flow events failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                },
                // The observer is gone: stop reading.
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}
