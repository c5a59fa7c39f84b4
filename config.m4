dnl pcr_email: PCR-360's email, a PHP extension written in Rust.
dnl `phpize && ./configure && make && make install` (and PIE, which runs the same steps) build it
dnl with cargo: the Rust crate is the extension, this file only finds cargo and hands the build
dnl over to Makefile.frag. Needs Rust 1.95 (rustup), clang and libclang-dev (bindgen reads
dnl PHP's headers), and the php-config of the PHP it is for.
dnl   PCR_EMAIL_CARGO_PROFILE=dev ./configure   a debug build (the default is release)

PHP_ARG_ENABLE([pcr_email],
  [whether to build pcr_email (PCR-360 email, built with cargo)],
  [AS_HELP_STRING([--enable-pcr_email], [Build the pcr_email extension (default: yes)])],
  [yes])

if test "$PHP_PCR_EMAIL" != "no"; then
  AC_PATH_PROG([PCR_EMAIL_CARGO], [cargo], [no], [$PATH:$HOME/.cargo/bin])
  if test "$PCR_EMAIL_CARGO" = "no"; then
    AC_MSG_ERROR([cargo was not found: install Rust 1.95 with rustup (https://rustup.rs), then run configure again])
  fi
  AC_MSG_CHECKING([the cargo profile])
  PCR_EMAIL_CARGO_PROFILE=${PCR_EMAIL_CARGO_PROFILE:-release}
  case "$PCR_EMAIL_CARGO_PROFILE" in
    release) PCR_EMAIL_PROFILE_DIR=release ;;
    dev) PCR_EMAIL_PROFILE_DIR=debug ;;
    *) AC_MSG_ERROR([PCR_EMAIL_CARGO_PROFILE must be release or dev, not $PCR_EMAIL_CARGO_PROFILE]) ;;
  esac
  AC_MSG_RESULT([$PCR_EMAIL_CARGO_PROFILE])
  dnl The php-config and php the build is for, as absolute paths (ext-php-rs's build script
  dnl takes PHP_CONFIG and PHP literally).
  PCR_EMAIL_PHP_CONFIG=`command -v "$PHP_CONFIG"`
  PCR_EMAIL_PHP=`command -v "$PHP_EXECUTABLE"`
  PHP_SUBST(PCR_EMAIL_CARGO)
  PHP_SUBST(PCR_EMAIL_CARGO_PROFILE)
  PHP_SUBST(PCR_EMAIL_PROFILE_DIR)
  PHP_SUBST(PCR_EMAIL_PHP_CONFIG)
  PHP_SUBST(PCR_EMAIL_PHP)
  PHP_ADD_BUILD_DIR([modules])
  dnl The module phpize's `make` builds and `make install` copies into the extension dir.
  PHP_MODULES="$PHP_MODULES \$(phplibdir)/pcr_email.so"
  PHP_ADD_MAKEFILE_FRAGMENT([$abs_srcdir/Makefile.frag])
fi
