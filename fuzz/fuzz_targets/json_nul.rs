//! `json_has_nul` against a JSON parser: for any text that parses as JSON, it says U+0000 is
//! there exactly when a string or a key of the parsed value holds it (escaped backslashes,
//! surrogate escapes and all).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagas::protocol::json_has_nul;
use serde_json::Value;

fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        assert_eq!(json_has_nul(data), holds_nul(&v), "{}", String::from_utf8_lossy(data));
    }
    // Whatever the bytes, the quoting helpers stay within their bounds.
    let s = String::from_utf8_lossy(data);
    assert!(sagas::protocol::clip(&s, 100).len() <= 100);
    assert!(sagas::protocol::quote(&s).chars().count() <= 80 * 10 + 40);
});
