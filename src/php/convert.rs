//! Conversions between PHP values and the `serde_json::Value` the core speaks.
//!
//! PHP arrays become JSON objects, except lists (keys 0..n in order), which become JSON arrays;
//! PHP objects become JSON objects of their public properties. Strings that are not valid
//! UTF-8 (binary attachment content) become `{"$binary": "<base64>"}` so no byte is lost;
//! `outgoing::message` accepts that form where bytes are expected.

use base64::Engine;
use ext_php_rs::boxed::ZBox;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::types::{ArrayKey, ZendHashTable, Zval};
use serde_json::{Map, Number, Value};

/// The key of the object that carries a binary (non-UTF-8) PHP string.
pub use crate::outgoing::message::BINARY_KEY;

/// Nesting deeper than this is refused instead of recursing without bound (a PHP array can
/// contain a reference to itself).
const MAX_DEPTH: usize = 64;

pub fn zval_to_json(zval: &Zval) -> Result<Value, String> {
    to_json(zval, 0)
}

fn to_json(zval: &Zval, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("value is nested too deeply (or refers to itself)".into());
    }
    if let Some(inner) = zval.reference() {
        return to_json(inner, depth + 1);
    }
    if zval.is_null() || matches!(zval.get_type(), ext_php_rs::flags::DataType::Undef) {
        return Ok(Value::Null);
    }
    if let Some(b) = zval.bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(i) = zval.long() {
        return Ok(Value::from(i));
    }
    if let Some(d) = zval.double() {
        return Ok(Number::from_f64(d)
            .map(Value::Number)
            .unwrap_or(Value::Null));
    }
    if zval.is_string() {
        let bytes = zval
            .zend_str()
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default();
        return Ok(match String::from_utf8(bytes) {
            Ok(s) => Value::String(s),
            Err(e) => {
                let mut map = Map::new();
                map.insert(
                    BINARY_KEY.to_string(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(e.as_bytes())),
                );
                Value::Object(map)
            }
        });
    }
    if let Some(array) = zval.array() {
        return table_to_json(array, depth);
    }
    if let Some(object) = zval.object() {
        let props = object
            .get_properties()
            .map_err(|e| format!("cannot read an object's properties: {e}"))?;
        let mut map = Map::new();
        for (key, value) in props.iter() {
            let name = key_string(&key);
            // Mangled names (protected/private) start with a NUL byte: not public, skip.
            if name.starts_with('\0') {
                continue;
            }
            map.insert(name, to_json(value, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    Err(format!(
        "unsupported PHP value of type {:?}",
        zval.get_type()
    ))
}

fn key_string(key: &ArrayKey<'_>) -> String {
    match key {
        ArrayKey::Long(i) => i.to_string(),
        ArrayKey::String(s) => s.clone(),
        ArrayKey::Str(s) => (*s).to_string(),
        ArrayKey::ZendString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
    }
}

fn table_to_json(table: &ZendHashTable, depth: usize) -> Result<Value, String> {
    let is_list = table
        .iter()
        .enumerate()
        .all(|(i, (key, _))| matches!(key, ArrayKey::Long(k) if k == i as i64));
    if is_list {
        let mut list = Vec::with_capacity(table.len());
        for (_, value) in table.iter() {
            list.push(to_json(value, depth + 1)?);
        }
        Ok(Value::Array(list))
    } else {
        let mut map = Map::new();
        for (key, value) in table.iter() {
            map.insert(key_string(&key), to_json(value, depth + 1)?);
        }
        Ok(Value::Object(map))
    }
}

/// JSON → PHP: objects become associative arrays, arrays become lists.
pub fn json_to_zval(value: &Value) -> Result<Zval, String> {
    let mut zval = Zval::new();
    match value {
        Value::Null => zval.set_null(),
        Value::Bool(b) => zval.set_bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                zval.set_long(i)
            } else {
                zval.set_double(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => zval
            .set_string(s, false)
            .map_err(|e| format!("cannot build a PHP string: {e}"))?,
        Value::Array(_) | Value::Object(_) => {
            let table = json_to_table(value)?;
            zval.set_hashtable(table);
        }
    }
    Ok(zval)
}

pub fn json_to_table(value: &Value) -> Result<ZBox<ZendHashTable>, String> {
    let mut table = ZendHashTable::new();
    match value {
        // "No context" is an empty array for PHP, not [null].
        Value::Null => {}
        Value::Array(items) => {
            for item in items {
                table
                    .push(json_to_zval(item)?)
                    .map_err(|e| format!("cannot build a PHP array: {e}"))?;
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                table
                    .insert(key.as_str(), json_to_zval(item)?)
                    .map_err(|e| format!("cannot build a PHP array: {e}"))?;
            }
        }
        other => {
            table
                .push(json_to_zval(other)?)
                .map_err(|e| format!("cannot build a PHP array: {e}"))?;
        }
    }
    Ok(table)
}

/// A JSON value as a PHP return value.
pub struct PhpJson(pub Value);

impl PhpJson {
    /// A typed result of the core (SPEC §5's shapes) as the PHP array it describes: its
    /// fields become the keys, `None` becomes null (or no key, where the type says so).
    pub fn of<T: serde::Serialize>(value: &T) -> crate::Result<PhpJson> {
        serde_json::to_value(value).map(PhpJson).map_err(|e| {
            crate::Error::message(format!("cannot build the PHP array of the result: {e}"))
        })
    }
}

impl IntoZval for PhpJson {
    const TYPE: ext_php_rs::flags::DataType = ext_php_rs::flags::DataType::Array;
    const NULLABLE: bool = false;

    fn set_zval(self, zv: &mut Zval, _persistent: bool) -> ext_php_rs::error::Result<()> {
        let converted =
            json_to_zval(&self.0).map_err(|_| ext_php_rs::error::Error::InvalidPointer)?;
        *zv = converted;
        Ok(())
    }
}
