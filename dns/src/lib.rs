//! skep's cluster DNS. The server (hickory-server, fed by API watches) lands
//! with the [dns] issue; the crate exists now so the workspace layout is the
//! final one.
