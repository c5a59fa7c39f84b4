//! The thin ext-php-rs boundary: the module, its php.ini settings and `phpinfo()` section,
//! the classes, and the conversions. No mail logic lives here.

mod arginfo;
mod convert;
mod exceptions;
mod host;
mod manager;
mod params;

use ext_php_rs::flags::IniEntryPermission;
use ext_php_rs::prelude::*;
use ext_php_rs::zend::{IniEntryDef, IniEntryDefs, ModuleEntry};
use ext_php_rs::{info_table_end, info_table_row, info_table_start};

pub use host::PhpInterfaceEmailHost;
pub use manager::EmailManager;

/// The php.ini settings (SPEC §1).
pub mod settings {
    use std::path::PathBuf;

    use ext_php_rs::zend::ExecutorGlobals;

    pub const CONFIG: &str = "pcr_email.config";
    pub const ENVIRONMENT: &str = "pcr_email.environment";

    fn ini(name: &str) -> Option<String> {
        ExecutorGlobals::get()
            .ini_values()
            .get(name)
            .cloned()
            .flatten()
            .filter(|v| !v.trim().is_empty())
    }

    /// `pcr_email.config`, default `/var/www/pcr360/configs/pcr360.ini`.
    pub fn config_file() -> PathBuf {
        PathBuf::from(ini(CONFIG).unwrap_or_else(|| crate::config::DEFAULT_CONFIG_FILE.into()))
    }

    /// `pcr_email.environment`, else the `APPLICATION_ENV` environment variable (as the web
    /// server gives it to PHP — Apache `SetEnv`, FastCGI params — or the process's own), else
    /// `prod`.
    pub fn environment() -> String {
        ini(ENVIRONMENT)
            .or_else(|| sapi_env("APPLICATION_ENV"))
            .or_else(|| std::env::var("APPLICATION_ENV").ok())
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "prod".to_string())
    }

    extern "C" {
        fn sapi_getenv(name: *const std::os::raw::c_char, len: usize) -> *mut std::os::raw::c_char;
    }

    /// The SAPI's view of an environment variable (what PHP's `getenv()` sees under a web
    /// server); None under the CLI, which has no such hook.
    fn sapi_env(name: &str) -> Option<String> {
        // SAFETY: PHP's own lookup; the result is an emalloc'd C string (or null) that we own.
        unsafe {
            let value = sapi_getenv(name.as_ptr().cast(), name.len());
            if value.is_null() {
                return None;
            }
            let text = std::ffi::CStr::from_ptr(value)
                .to_string_lossy()
                .into_owned();
            ext_php_rs::alloc::efree(value.cast());
            Some(text)
        }
    }
}

static INI_ENTRIES: IniEntryDefs<3> = IniEntryDefs::new([
    IniEntryDef::new(
        c"pcr_email.config",
        c"/var/www/pcr360/configs/pcr360.ini",
        IniEntryPermission::PerDir.union(IniEntryPermission::System),
    ),
    IniEntryDef::new(
        c"pcr_email.environment",
        c"",
        IniEntryPermission::PerDir.union(IniEntryPermission::System),
    ),
    IniEntryDef::end(),
]);

pub fn startup(_ty: i32, module_number: i32) -> i32 {
    // Large blocks as mappings of their own, given back when freed (see `crate::malloc`).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = crate::malloc::tune();
    IniEntryDef::register(INI_ENTRIES.as_slice(), module_number);
    match exceptions::register_all() {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

extern "C" fn request_startup(_ty: i32, _module_number: i32) -> i32 {
    arginfo::patch_once();
    0
}

extern "C" fn request_shutdown(_ty: i32, _module_number: i32) -> i32 {
    manager::clear_default_host();
    0
}

extern "C" fn info(_module: *mut ModuleEntry) {
    info_table_start!();
    info_table_row!("pcr_email support", "enabled");
    info_table_row!("Version", env!("CARGO_PKG_VERSION"));
    info_table_row!(
        "Effective pcr_email.config",
        settings::config_file().display().to_string()
    );
    info_table_row!("Effective pcr_email.environment", settings::environment());
    info_table_end!();
    // The settings themselves (with their local/master values) follow, as PHP prints them.
    // SAFETY: PHP's own printer of a module's ini entries, given the module PHP passed us.
    unsafe { display_ini_entries(_module) };
}

#[php_module]
#[php(startup = "startup")]
pub fn get_module(module: ModuleBuilder) -> ModuleBuilder {
    module
        .interface::<PhpInterfaceEmailHost>()
        .class::<EmailManager>()
        .request_startup_function(request_startup)
        .request_shutdown_function(request_shutdown)
        .info_function(info)
}

extern "C" {
    fn display_ini_entries(module: *mut ModuleEntry);
}
