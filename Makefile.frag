# Included by the Makefile that phpize + configure write (see config.m4): builds the extension
# with cargo. CARGO_TARGET_DIR is honoured; the encryption tool is built beside it.
PCR_EMAIL_TARGET_DIR = $${CARGO_TARGET_DIR:-$(srcdir)/target}

# Rebuilt when a source changed, so `make install` (often run as root, as PIE does through
# sudo) only copies what `make` built and never runs cargo itself.
# phpize builds in the source tree (make runs there; srcdir is defined later in the Makefile).
PCR_EMAIL_SOURCES = $(CURDIR)/Cargo.toml $(CURDIR)/Cargo.lock $(shell find "$(CURDIR)/src" -name "*.rs")

$(phplibdir)/pcr_email.so: $(PCR_EMAIL_SOURCES)
	# The PHP this is for: ext-php-rs reads its headers through php-config. When it is the
	# one on PATH, nothing is set, so a build that shares CARGO_TARGET_DIR with plain cargo
	# builds does not rebuild ext-php-rs each time.
	cd "$(srcdir)" && \
	if [ "$$(readlink -f "$$(command -v php-config)")" != "$$(readlink -f "$(PCR_EMAIL_PHP_CONFIG)")" ]; then \
		export PHP_CONFIG="$(PCR_EMAIL_PHP_CONFIG)" PHP="$(PCR_EMAIL_PHP)"; \
	fi && \
	"$(PCR_EMAIL_CARGO)" build --locked --profile "$(PCR_EMAIL_CARGO_PROFILE)" --features php --lib
	cd "$(srcdir)" && "$(PCR_EMAIL_CARGO)" build --locked --profile "$(PCR_EMAIL_CARGO_PROFILE)" --bin pcr-email-encrypt --bin pcr-email-state
	@mkdir -p "$(phplibdir)"
	cp "$(PCR_EMAIL_TARGET_DIR)/$(PCR_EMAIL_PROFILE_DIR)/pcr-email-encrypt" "$(phplibdir)/../pcr-email-encrypt"
	cp "$(PCR_EMAIL_TARGET_DIR)/$(PCR_EMAIL_PROFILE_DIR)/pcr-email-state" "$(phplibdir)/../pcr-email-state"
	cp "$(PCR_EMAIL_TARGET_DIR)/$(PCR_EMAIL_PROFILE_DIR)/libpcr_email.so" "$@"

install: install-pcr-email-encrypt
.PHONY: install-pcr-email-encrypt
install-pcr-email-encrypt: $(phplibdir)/pcr_email.so
	$(mkinstalldirs) "$(INSTALL_ROOT)$(prefix)/bin"
	$(INSTALL) -m 0755 "$(phplibdir)/../pcr-email-encrypt" "$(INSTALL_ROOT)$(prefix)/bin/pcr-email-encrypt"
	$(INSTALL) -m 0755 "$(phplibdir)/../pcr-email-state" "$(INSTALL_ROOT)$(prefix)/bin/pcr-email-state"
