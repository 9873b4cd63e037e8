//! Reading Kubernetes objects kept as `serde_json::Value`.

use serde_json::Value;

/// The string at JSON pointer `p`, if there is one.
pub(crate) fn str_at<'a>(v: &'a Value, p: &str) -> Option<&'a str> {
    v.pointer(p).and_then(Value::as_str)
}

/// The strings of the array at JSON pointer `p` (non-strings skipped).
pub(crate) fn strings_at(v: &Value, p: &str) -> Vec<String> {
    v.pointer(p)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}
