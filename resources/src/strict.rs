//! Strict decoding, as `kubectl apply`'s default strict field validation: a duplicate key
//! in a mapping and a field the type does not know are errors naming the field's path,
//! not silently dropped (a typo such as `matchLabel` or `port:` changes what a policy
//! means, and a second `policyTypes` key replaces the first).

use std::fmt;

use serde::de::{DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::{Map, Number, Value};

/// A field path as the errors spell it: `spec.ingress[0].from`.
fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Reads any self-describing input (YAML, JSON) into a JSON value, recording the path of
/// every key that occurs twice in one mapping (the later value is kept, as a map would).
pub struct ValueSeed<'a> {
    pub path: String,
    pub duplicates: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        de.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(ValueSeed {
            path: format!("{}[{}]", self.path, items.len()),
            duplicates: &mut *self.duplicates,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = child(&self.path, &key);
            let value = map.next_value_seed(ValueSeed {
                path: path.clone(),
                duplicates: &mut *self.duplicates,
            })?;
            if out.insert(key, value).is_some() {
                self.duplicates.push(path);
            }
        }
        Ok(Value::Object(out))
    }
}

/// A JSON text into a value, with the paths of its duplicate keys.
pub fn json_value(text: &str) -> Result<(Value, Vec<String>), serde_json::Error> {
    let mut duplicates = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    let value = ValueSeed {
        path: String::new(),
        duplicates: &mut duplicates,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, duplicates))
}

/// One YAML document into a value, with the paths of its duplicate keys.
pub fn yaml_value<'de>(
    de: serde_yaml::Deserializer<'de>,
) -> Result<(Value, Vec<String>), serde_yaml::Error> {
    let mut duplicates = Vec::new();
    let value = ValueSeed {
        path: String::new(),
        duplicates: &mut duplicates,
    }
    .deserialize(de)?;
    Ok((value, duplicates))
}

/// Why a value did not decode: the field's path (empty: the whole value) and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// `spec.ingress[0].from`, leaving out the optional and newtype layers.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => child(&field_path(parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Decodes `value` into `T`; a type error names its path, and so does the first field
/// `T` does not know (`unknown field`).
pub fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, DecodeError> {
    let mut unknown: Vec<String> = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = {
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        serde_ignored::deserialize(de, |path| unknown.push(field_path(&path)))
    };
    match result {
        // Every object has its type meta, whether or not the decoded type keeps it.
        Ok(v) => match unknown
            .into_iter()
            .find(|p| p != "apiVersion" && p != "kind")
        {
            None => Ok(v),
            Some(path) => Err(DecodeError {
                path,
                message: "unknown field".into(),
            }),
        },
        Err(e) => {
            let path = track.path().to_string();
            Err(DecodeError {
                path: if path == "." { String::new() } else { path },
                message: e.to_string(),
            })
        }
    }
}

/// The deepest nesting of YAML flow collections (`[`, `{`) in `text`, and the line where it
/// is first reached: a cheap scan, done before the parser, which takes time quadratic in
/// the depth (200 KB of `[` took 20-47 s). Quoted strings and comments are skipped, and a
/// bracket inside a plain scalar (`a[b`) does not count. Block nesting needs a line of
/// indentation per level, so the input size bounds it.
pub fn flow_depth(text: &str) -> (usize, usize) {
    let (mut depth, mut max, mut max_line, mut line) = (0usize, 0usize, 1usize, 1usize);
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' if prev.is_whitespace() => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' if !prev.is_alphanumeric() => {
                let quote = c;
                while let Some(q) = chars.next() {
                    match q {
                        '\\' if quote == '"' => {
                            chars.next();
                        }
                        '\n' => line += 1,
                        _ if q == quote => {
                            if quote == '\'' && chars.peek() == Some(&'\'') {
                                chars.next();
                            } else {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            '[' | '{' if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':' | '-') => {
                depth += 1;
                if depth > max {
                    (max, max_line) = (depth, line);
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    (max, max_line)
}

/// An input file's bytes as text, read as `kubectl apply -f` reads a file (cli-runtime's
/// `FileVisitor`, `unicode.BOMOverride`): a leading UTF-8 byte-order mark is dropped, and a
/// UTF-16 one (little or big endian, as some Windows editors write) means UTF-16 text,
/// decoded. Where kubectl replaces a byte that is not UTF-8 with U+FFFD and carries on, this
/// is an error saying where (byte offset and line): a silently altered value is worse than
/// a refused file.
pub fn text_of(bytes: Vec<u8>) -> Result<String, String> {
    if let Some(le) = bytes.strip_prefix(&[0xff, 0xfe][..]) {
        return utf16(le, u16::from_le_bytes);
    }
    if let Some(be) = bytes.strip_prefix(&[0xfe, 0xff][..]) {
        return utf16(be, u16::from_be_bytes);
    }
    let body = bytes
        .strip_prefix(&[0xef, 0xbb, 0xbf][..])
        .unwrap_or(&bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let line = body[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            let offset = at + (bytes.len() - body.len());
            Err(format!(
                "not UTF-8: byte 0x{:02x} at byte offset {offset} (line {line})",
                body[at]
            ))
        }
    }
}

/// UTF-16 text after its byte-order mark; an odd length or an unpaired surrogate is an
/// error at its byte offset (counting the mark).
fn utf16(body: &[u8], unit: fn([u8; 2]) -> u16) -> Result<String, String> {
    if !body.len().is_multiple_of(2) {
        return Err(format!(
            "UTF-16 text (it starts with a UTF-16 byte-order mark) of an odd length: a byte is missing at byte offset {}",
            body.len() + 2
        ));
    }
    let units = body.chunks_exact(2).map(|c| unit([c[0], c[1]]));
    let mut text = String::with_capacity(body.len() / 2);
    let mut line = 1;
    for c in char::decode_utf16(units) {
        match c {
            Ok(c) => {
                line += usize::from(c == '\n');
                text.push(c);
            }
            Err(_) => {
                let units_before: usize = text.chars().map(char::len_utf16).sum();
                return Err(format!(
                    "not UTF-16: an unpaired surrogate at byte offset {} (line {line})",
                    2 + units_before * 2
                ));
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        pod_selector: Option<Selector>,
        ports: Option<Vec<u16>>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    #[serde(rename_all = "camelCase")]
    struct Selector {
        match_labels: Option<std::collections::BTreeMap<String, String>>,
    }

    #[test]
    fn text_drops_a_bom_and_names_the_first_bad_byte() {
        assert_eq!(text_of(b"\xef\xbb\xbfa: 1\n".to_vec()).unwrap(), "a: 1\n");
        assert_eq!(
            text_of(b"a: 1\nb: \xff\n".to_vec()).unwrap_err(),
            "not UTF-8: byte 0xff at byte offset 8 (line 2)"
        );
        // Issue 12.12: UTF-16 with its byte-order mark is decoded, as kubectl does.
        let le: Vec<u8> = [0xff, 0xfe]
            .into_iter()
            .chain("a: é\n".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert_eq!(text_of(le).unwrap(), "a: é\n");
        let be: Vec<u8> = [0xfe, 0xff]
            .into_iter()
            .chain("a: 𝄞\n".encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        assert_eq!(text_of(be).unwrap(), "a: 𝄞\n");
        // 'a' '\n' then a lone high surrogate: units 0-1 after the mark, at byte 6.
        assert_eq!(
            text_of(vec![0xff, 0xfe, b'a', 0, b'\n', 0, 0x00, 0xd8, b'b', 0]).unwrap_err(),
            "not UTF-16: an unpaired surrogate at byte offset 6 (line 2)"
        );
        assert!(text_of(vec![0xff, 0xfe, b'a'])
            .unwrap_err()
            .contains("odd length"));
    }

    #[test]
    fn flow_depth_counts_collections_not_scalars_strings_or_comments() {
        assert_eq!(flow_depth("a: [[{b: [1]}]]\n").0, 4);
        assert_eq!(flow_depth("a: x[y\nb: \"[[[\"\nc: '[[' # [[[[\n").0, 0);
        let deep = format!("a:\n  b: {}", "[".repeat(500));
        assert_eq!(flow_depth(&deep), (500, 2));
    }

    #[test]
    fn duplicate_keys_are_found_with_their_path() {
        let text = "spec:\n  a: 1\n  list:\n  - {x: 1, x: 2}\n  a: 3\n";
        let de = serde_yaml::Deserializer::from_str(text);
        let (value, dups) = yaml_value(de).unwrap();
        assert_eq!(dups, ["spec.list[0].x", "spec.a"]);
        assert_eq!(value["spec"]["a"], 3);
        let (_, dups) = json_value(r#"{"a": {"b": 1, "b": 2}}"#).unwrap();
        assert_eq!(dups, ["a.b"]);
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_path() {
        let v = serde_json::json!({"podSelector": {"matchLabel": {"a": "b"}}});
        let e = decode::<Spec>(&v).unwrap_err();
        assert_eq!(e.path, "podSelector.matchLabel");
        assert_eq!(e.to_string(), "podSelector.matchLabel: unknown field");
        let v = serde_json::json!({"ports": [1, "x"]});
        assert_eq!(decode::<Spec>(&v).unwrap_err().path, "ports[1]");
        let v = serde_json::json!({"podSelector": {"matchLabels": {"a": "b"}}, "ports": [1]});
        assert!(decode::<Spec>(&v).is_ok());
    }
}
