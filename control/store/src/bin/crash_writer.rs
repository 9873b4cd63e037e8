//! Crash-test helper: opens the SQLite store at the path given as the only
//! argument and writes keys from 16 concurrent tasks until it is killed,
//! printing `ack <key>` on stdout after each write is acknowledged.
//! `tests/crash.rs` SIGKILLs it mid-stream and checks every acknowledged key
//! survived.

use bytes::Bytes;
use skep_store::{SqliteStore, Store};
use std::{io::Write, sync::Arc};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: store-crash-writer STORE_FILE"))?;
    let store = Arc::new(SqliteStore::open(&path)?);
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/crash/{t:02}/{i:08}");
                let value = Bytes::from(format!("value of {key}"));
                store.create(&key, value).await?;
                // One write(2) per line, so a kill never splits a line.
                let line = format!("ack {key}\n");
                std::io::stdout().lock().write_all(line.as_bytes())?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
