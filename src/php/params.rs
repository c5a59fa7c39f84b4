//! Method parameters converted as PHP converts those of its own functions.
//!
//! ext-php-rs converts an argument before the method runs and, when that fails, throws
//! "Invalid value given for argument `x`" — not PHP's wording, and without PHP's non-strict
//! coercions (`resolveAccount('general', '1')` as Zend_Db hands the tenant over). So each
//! parameter here takes the argument as the caller passed it, and the method converts it
//! with PHP's own routines (`zend_parse_arg_*_slow`, as `zend_parse_parameters` does):
//!
//! - coercion follows the caller's mode: numeric strings, floats with an integral value and
//!   bools become `int`, scalars become `string`, in a file without `declare(strict_types=1)`;
//!   with it, only the declared type is accepted (PHP's rules, PHP's deprecation notices, e.g.
//!   for `null` given to a non-nullable scalar);
//! - a refused value is PHP's TypeError, raised by PHP's `zend_argument_type_error`, e.g.
//!   `PCR_Utility_EmailManager::send(): Argument #1 ($message) must be of type array, string
//!   given`.
//!
//! The declared types PHP's Reflection shows come from each type's `TYPE`/`NULLABLE`, patched
//! where ext-php-rs cannot say it (see `super::arginfo`).

use std::ffi::CString;
use std::os::raw::c_char;

use ext_php_rs::convert::FromZval;
use ext_php_rs::exception::{PhpException, PhpResult};
use ext_php_rs::ffi::{zend_long, zend_string, zval};
use ext_php_rs::flags::DataType;
use ext_php_rs::types::{ZendHashTable, Zval};
use ext_php_rs::zend::{ce, ClassEntry, ExecutorGlobals};

use super::host::HOST_INTERFACE;

extern "C" {
    fn zend_parse_arg_long_slow(arg: *const zval, dest: *mut zend_long, arg_num: u32) -> bool;
    fn zend_parse_arg_str_slow(arg: *mut zval, dest: *mut *mut zend_string, arg_num: u32) -> bool;
    fn zend_parse_arg_str_or_long_slow(
        arg: *mut zval,
        dest_str: *mut *mut zend_string,
        dest_long: *mut zend_long,
        arg_num: u32,
    ) -> bool;
    fn zend_argument_type_error(arg_num: u32, format: *const c_char, ...);
    fn zend_argument_value_error(arg_num: u32, format: *const c_char, ...);
    fn zend_zval_type_name(arg: *const zval) -> *const c_char;
}

macro_rules! param {
    ($(#[$doc:meta])* $name:ident, $ty:expr, $nullable:expr) => {
        $(#[$doc])*
        pub struct $name(Option<Zval>);

        impl<'a> FromZval<'a> for $name {
            const TYPE: DataType = $ty;
            const NULLABLE: bool = $nullable;

            fn from_zval(zval: &'a Zval) -> Option<Self> {
                Some($name(Some(zval.shallow_clone())))
            }

            fn from_missing() -> Option<Self> {
                $nullable.then_some($name(None))
            }
        }

        impl $name {
            /// The argument as passed; `None` when the caller omitted it.
            #[allow(dead_code)]
            fn zval(&mut self) -> Option<&mut Zval> {
                self.0.as_mut()
            }
        }
    };
}

param!(
    /// `array $x`.
    ArrayParam,
    DataType::Array,
    false
);
param!(
    /// `int $x`.
    IntParam,
    DataType::Long,
    false
);
param!(
    /// `string $x`.
    StrParam,
    DataType::String,
    false
);
param!(
    /// `int $x = <default>` (the arginfo is patched to non-nullable with its default).
    IntDefaultParam,
    DataType::Long,
    true
);
param!(
    /// `string $x = <default>` (the arginfo is patched to non-nullable with its default).
    StrDefaultParam,
    DataType::String,
    true
);
param!(
    /// `?string $x = null`.
    NullableStrParam,
    DataType::String,
    true
);
param!(
    /// `PCR_Utility_EmailHost $host`.
    HostParam,
    DataType::object(HOST_INTERFACE),
    false
);
param!(
    /// `?PCR_Utility_EmailHost $host = null`.
    NullableHostParam,
    DataType::object(HOST_INTERFACE),
    true
);
param!(
    /// `array|string|object|null $x = null` (the arginfo is patched to say so).
    AnyParam,
    DataType::Mixed,
    true
);
param!(
    /// `int|string $x` (the arginfo is patched to say so).
    IntOrStrParam,
    DataType::Mixed,
    false
);

/// PHP's TypeError for argument `arg_num` of the running method, unless converting it already
/// raised an exception (a deprecation turned into one by an error handler): that one stands.
fn type_error(arg_num: u32, expected: &str, given: &Zval) -> PhpException {
    if !ExecutorGlobals::has_exception() {
        // SAFETY: PHP's name of a live zval's type: a static or class-name C string.
        let given = unsafe { std::ffi::CStr::from_ptr(zend_zval_type_name(given)) };
        let text = CString::new(format!(
            "must be of type {expected}, {} given",
            given.to_string_lossy()
        ))
        .unwrap_or_default();
        // SAFETY: called from the running internal method (PHP names it and the parameter
        // from its frame and arginfo); "%s" with one C string argument.
        unsafe { zend_argument_type_error(arg_num, c"%s".as_ptr(), text.as_ptr()) };
    }
    pending()
}

/// Returned once PHP has raised the exception itself: ext-php-rs's `throw()` leaves a pending
/// exception alone, so the caller sees PHP's.
fn pending() -> PhpException {
    PhpException::new(String::new(), 0, ce::type_error())
}

/// Strings reach the core as UTF-8; a binary string is PHP's ValueError for that argument.
fn utf8(arg_num: u32, s: &ext_php_rs::types::ZendStr) -> PhpResult<String> {
    match std::str::from_utf8(s.as_bytes()) {
        Ok(text) => Ok(text.to_string()),
        Err(_) => {
            // SAFETY: as in `type_error`.
            unsafe {
                zend_argument_value_error(arg_num, c"%s".as_ptr(), c"must be valid UTF-8".as_ptr())
            };
            Err(pending())
        }
    }
}

fn long(z: &mut Zval, arg_num: u32, expected: &str) -> PhpResult<i64> {
    if let Some(i) = z.long() {
        return Ok(i);
    }
    let mut out: zend_long = 0;
    // SAFETY: PHP's own weak/strict conversion of the running method's argument.
    if unsafe { zend_parse_arg_long_slow(z, &raw mut out, arg_num) } {
        return Ok(out);
    }
    Err(type_error(arg_num, expected, z))
}

fn string(z: &mut Zval, arg_num: u32, expected: &str) -> PhpResult<String> {
    if let Some(s) = z.zend_str() {
        return utf8(arg_num, s);
    }
    let mut out: *mut zend_string = std::ptr::null_mut();
    // SAFETY: as in `long`; on success `out` points into `z` (converted in place), which we own.
    if unsafe { zend_parse_arg_str_slow(z, &raw mut out, arg_num) } {
        // SAFETY: set by PHP on success.
        if let Some(s) = unsafe { out.cast::<ext_php_rs::types::ZendStr>().as_ref() } {
            return utf8(arg_num, s);
        }
    }
    Err(type_error(arg_num, expected, z))
}

impl ArrayParam {
    pub fn array(&mut self, arg_num: u32) -> PhpResult<&ZendHashTable> {
        let Some(z) = self.0.as_ref() else {
            return Err(pending());
        };
        match z.array() {
            Some(table) => Ok(table),
            None => Err(type_error(arg_num, "array", z)),
        }
    }
}

impl IntParam {
    pub fn int(mut self, arg_num: u32) -> PhpResult<i64> {
        match self.zval() {
            Some(z) => long(z, arg_num, "int"),
            None => Err(pending()),
        }
    }
}

impl IntDefaultParam {
    pub fn int_or(mut self, arg_num: u32, default: i64) -> PhpResult<i64> {
        match self.zval() {
            Some(z) => long(z, arg_num, "int"),
            None => Ok(default),
        }
    }
}

impl StrParam {
    pub fn string(mut self, arg_num: u32) -> PhpResult<String> {
        match self.zval() {
            Some(z) => string(z, arg_num, "string"),
            None => Err(pending()),
        }
    }
}

impl StrDefaultParam {
    pub fn string_or(mut self, arg_num: u32, default: &str) -> PhpResult<String> {
        match self.zval() {
            Some(z) => string(z, arg_num, "string"),
            None => Ok(default.to_string()),
        }
    }
}

impl NullableStrParam {
    pub fn string(mut self, arg_num: u32) -> PhpResult<Option<String>> {
        match self.zval() {
            Some(z) if !z.is_null() => string(z, arg_num, "?string").map(Some),
            _ => Ok(None),
        }
    }
}

fn host(z: &Zval, arg_num: u32, expected: &str) -> PhpResult<Zval> {
    let implements = z.object().is_some_and(|object| {
        ClassEntry::try_find(HOST_INTERFACE).is_some_and(|iface| object.instance_of(iface))
    });
    if implements {
        Ok(z.shallow_clone())
    } else {
        Err(type_error(arg_num, expected, z))
    }
}

impl HostParam {
    pub fn host(&self, arg_num: u32) -> PhpResult<Zval> {
        match &self.0 {
            Some(z) => host(z, arg_num, HOST_INTERFACE),
            None => Err(pending()),
        }
    }
}

impl NullableHostParam {
    pub fn host(&self, arg_num: u32) -> PhpResult<Option<Zval>> {
        match &self.0 {
            Some(z) if !z.is_null() => host(z, arg_num, &format!("?{HOST_INTERFACE}")).map(Some),
            _ => Ok(None),
        }
    }
}

impl AnyParam {
    /// `array|string|object|null`: another scalar becomes a string in non-strict mode, as PHP
    /// coerces for a union that contains `string`.
    pub fn value(mut self, arg_num: u32) -> PhpResult<Option<Zval>> {
        const TYPES: &str = "object|array|string|null";
        let Some(z) = self.zval() else {
            return Ok(None);
        };
        if z.is_null() || z.array().is_some() || z.object().is_some() || z.is_string() {
            return Ok(Some(z.shallow_clone()));
        }
        let text = string(z, arg_num, TYPES)?;
        let mut out = Zval::new();
        out.set_string(&text, false)
            .map_err(|_| type_error(arg_num, TYPES, z))?;
        Ok(Some(out))
    }
}

impl IntOrStrParam {
    /// `int|string`, as text (`'master'` or a RECID).
    pub fn text(mut self, arg_num: u32) -> PhpResult<String> {
        const TYPES: &str = "string|int";
        let Some(z) = self.zval() else {
            return Err(pending());
        };
        if let Some(i) = z.long() {
            return Ok(i.to_string());
        }
        if let Some(s) = z.zend_str() {
            return utf8(arg_num, s);
        }
        let mut text: *mut zend_string = std::ptr::null_mut();
        let mut number: zend_long = 0;
        // SAFETY: as in `long`.
        if unsafe { zend_parse_arg_str_or_long_slow(z, &raw mut text, &raw mut number, arg_num) } {
            // SAFETY: set by PHP on success (null when it gave an int).
            return match unsafe { text.cast::<ext_php_rs::types::ZendStr>().as_ref() } {
                Some(s) => utf8(arg_num, s),
                None => Ok(number.to_string()),
            };
        }
        Err(type_error(arg_num, TYPES, z))
    }
}
