//! skep's mTLS sidecar (rustls) and its SPIFFE identity client. The proxy
//! lands with the [mesh] issue; the crate exists now so the workspace layout
//! is the final one.
