//! What ext-php-rs cannot yet declare: union parameter types (`array|string|object|null`,
//! `int|string`), optional non-nullable parameters whose default the method applies (see
//! `super::params`) and the `#[\SensitiveParameter]` attribute on password parameters. All are
//! written into the registered methods' arginfo once, at the first request startup (the
//! classes are registered after our MINIT hook runs). Reflection, `php --re`, the generated
//! stubs and PHP's stack-trace redaction then see them.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use std::sync::Once;

use ext_php_rs::ffi::{
    zend_function, zend_hash_str_find_ptr_lc, zend_internal_arg_info, HashTable,
};
use ext_php_rs::types::ZendStr;
use ext_php_rs::zend::ClassEntry;

pub(super) const MAY_BE_NULL: u32 = 1 << 1;
pub(super) const MAY_BE_LONG: u32 = 1 << 4;
pub(super) const MAY_BE_STRING: u32 = 1 << 6;
const MAY_BE_ARRAY: u32 = 1 << 7;
const MAY_BE_OBJECT: u32 = 1 << 8;
/// Bits of `zend_type.type_mask` that describe the type; the ones above carry arg flags.
const TYPE_MASK: u32 = (1 << 25) - 1;
const ZEND_ATTRIBUTE_PERSISTENT: u32 = 1;

extern "C" {
    fn zend_add_attribute(
        attributes: *mut *mut HashTable,
        name: *mut ext_php_rs::ffi::zend_string,
        argc: u32,
        flags: u32,
        offset: u32,
        lineno: u32,
    ) -> *mut c_void;
}

static PATCH: Once = Once::new();

pub fn patch_once() {
    PATCH.call_once(|| {
        let Some(ce) = ClassEntry::try_find("PCR_Utility_EmailManager") else {
            return;
        };
        set_union(
            ce,
            "eventcheckmail",
            0,
            MAY_BE_ARRAY | MAY_BE_STRING | MAY_BE_OBJECT | MAY_BE_NULL,
        );
        set_union(ce, "checkaccount", 0, MAY_BE_LONG | MAY_BE_STRING);
        // Optional but not nullable, with PHP-literal defaults (converted in the method,
        // see `super::params`).
        set_default(ce, "resolveaccount", 0, MAY_BE_STRING, c"'general'");
        set_default(ce, "resolveaccount", 1, MAY_BE_LONG, c"0");
        sensitive(ce, "encryptpassword", 0);
        // The authorization code is a one-time secret: kept out of stack traces too.
        sensitive(ce, "completeauthorization", 1);
    });
}

fn method(ce: &ClassEntry, lc_name: &str) -> Option<*mut zend_function> {
    // SAFETY: the function table of a registered internal class; lookup by lowercase name.
    let ptr = unsafe {
        zend_hash_str_find_ptr_lc(
            &raw const ce.function_table,
            lc_name.as_ptr().cast::<c_char>(),
            lc_name.len(),
        )
    };
    (!ptr.is_null()).then_some(ptr.cast::<zend_function>())
}

fn set_union(ce: &ClassEntry, lc_name: &str, arg: u32, mask: u32) {
    let Some(func) = method(ce, lc_name) else {
        return;
    };
    // SAFETY: an internal method registered by this extension; `arg` < num_args is checked.
    unsafe {
        let internal = &mut (*func).internal_function;
        if arg >= internal.num_args || internal.arg_info.is_null() {
            return;
        }
        let info: *mut zend_internal_arg_info = internal.arg_info.add(arg as usize);
        let ty = &mut (*info).type_;
        ty.ptr = std::ptr::null_mut();
        ty.type_mask = (ty.type_mask & !TYPE_MASK) | mask;
    }
}

/// Declares argument `arg` as `type $x = default` (not nullable); `default` is a PHP literal,
/// as Reflection and the generated stubs read it.
fn set_default(ce: &ClassEntry, lc_name: &str, arg: u32, mask: u32, default: &'static CStr) {
    set_union(ce, lc_name, arg, mask);
    let Some(func) = method(ce, lc_name) else {
        return;
    };
    // SAFETY: as in `set_union`; the default is a static C string PHP only reads.
    unsafe {
        let internal = &mut (*func).internal_function;
        if arg >= internal.num_args || internal.arg_info.is_null() {
            return;
        }
        (*internal.arg_info.add(arg as usize)).default_value = default.as_ptr();
    }
}

fn sensitive(ce: &ClassEntry, lc_name: &str, arg: u32) {
    let Some(func) = method(ce, lc_name) else {
        return;
    };
    let name = ZendStr::new_interned("SensitiveParameter", true).into_raw();
    // SAFETY: as `zend_add_parameter_attribute` does for internal functions (persistent).
    unsafe {
        zend_add_attribute(
            &raw mut (*func).common.attributes,
            name,
            0,
            ZEND_ATTRIBUTE_PERSISTENT,
            arg + 1,
            0,
        );
    }
}
