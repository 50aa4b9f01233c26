//! Startup of the real binary: everything that can fail at start fails before the
//! "serving" line, as one line on stderr that names the key or file, with exit code 1
//! and no panic or backtrace whatever `RUST_BACKTRACE` says; `--check-config` finds the
//! same problems without binding.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::binary::*;

/// A self-signed certificate and its key, as PEM.
fn certificate(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    (cert.pem(), key.serialize_pem())
}

struct Case {
    name: &'static str,
    /// Config text after `listen`; `{dir}` is the case's temp directory.
    config: String,
    /// What the one line must contain.
    expected: &'static str,
    /// Whether `--check-config` finds it too (binding is not checked there).
    found_by_check: bool,
}

fn cluster() -> &'static str {
    "[[cluster]]\ncode = \"EU\"\nnodes = [\"http://127.0.0.1:9/emservice/EMServiceServlet\"]\n"
}

fn cases(directory: &Path, busy: &TcpListener) -> Vec<Case> {
    let dir = directory.display().to_string();
    let (cert, key) = certificate("localhost");
    let (_, other_key) = certificate("other");
    std::fs::write(directory.join("server.pem"), &cert).unwrap();
    std::fs::write(directory.join("server.key"), &key).unwrap();
    std::fs::write(directory.join("other.key"), &other_key).unwrap();
    std::fs::write(directory.join("garbage.pem"), "not a certificate\n").unwrap();
    std::fs::write(directory.join("not-a-database.sqlite"), vec![b'x'; 4096]).unwrap();
    let history_off = "[history]\nenabled = false\n";
    let tls = |cert: &str, key: &str, ca: Option<&str>| {
        let ca = ca
            .map(|ca| format!("client_ca_file = \"{dir}/{ca}\"\n"))
            .unwrap_or_default();
        format!(
            "[tls]\ncert_file = \"{dir}/{cert}\"\nkey_file = \"{dir}/{key}\"\n{ca}{history_off}"
        )
    };
    vec![
        Case {
            name: "certificate file missing",
            config: tls("missing.pem", "server.key", None),
            expected: "tls.cert_file",
            found_by_check: true,
        },
        Case {
            name: "key of another certificate",
            config: tls("server.pem", "other.key", None),
            expected: "tls.key_file: the key does not belong to the certificate",
            found_by_check: true,
        },
        Case {
            name: "client CA not a certificate",
            config: tls("server.pem", "server.key", Some("garbage.pem")),
            expected: "tls.client_ca_file",
            found_by_check: true,
        },
        Case {
            name: "cluster ca_file missing",
            config: format!(
                "{history_off}[[cluster]]\ncode = \"EU\"\nnodes = [\"https://127.0.0.1:9/x\"]\nca_file = \"{dir}/cucm-ca.pem\"\n"
            ),
            expected: "cucm-ca.pem",
            found_by_check: true,
        },
        Case {
            name: "history directory missing",
            config: format!("[history]\npath = \"{dir}/no/such/dir/h.sqlite\"\n"),
            expected: "history.path",
            found_by_check: true,
        },
        Case {
            name: "history file not a database",
            config: format!("[history]\npath = \"{dir}/not-a-database.sqlite\"\n"),
            expected: "history.path",
            found_by_check: true,
        },
        Case {
            name: "history URL malformed",
            config: "[history]\nurl = \"postgres://bc@127.0.0.1:notaport/db\"\n".to_string(),
            expected: "history.url",
            found_by_check: true,
        },
        Case {
            name: "dashboard password not a hash",
            config: format!(
                "{history_off}[dashboard]\nusers = [{{ name = \"ops\", password_hash = \"plain\" }}]\n"
            ),
            expected: "dashboard.users.password_hash",
            found_by_check: true,
        },
        Case {
            name: "unknown key",
            config: format!("colour = \"blue\"\n{history_off}"),
            expected: "unknown field `colour`",
            found_by_check: true,
        },
        Case {
            name: "address in use",
            config: format!(
                "listen = \"{}\"\n{history_off}",
                busy.local_addr().expect("addr")
            ),
            expected: "cannot bind",
            found_by_check: false,
        },
    ]
}

#[test]
fn every_startup_failure_is_one_line_and_exit_code_1_before_serving() {
    let directory = tempfile::tempdir().expect("temp dir");
    let busy = TcpListener::bind("127.0.0.1:0").expect("a port to occupy");
    let mut failures = Vec::new();
    for case in cases(directory.path(), &busy) {
        // `listen` first unless the case sets its own; the cluster last.
        let listen = if case.config.contains("listen =") {
            ""
        } else {
            "listen = \"127.0.0.1:0\"\n"
        };
        let cluster = if case.config.contains("[[cluster]]") {
            ""
        } else {
            cluster()
        };
        let text = format!(
            "{listen}workers = 1\ndrain_ms = 0\n{}{cluster}",
            case.config
        );
        let path = write_config(directory.path(), "case.toml", &text);
        for check in [false, true] {
            let mut command = Command::new(BINARY);
            command
                .args(["--config", path.to_str().unwrap()])
                .env("RUST_BACKTRACE", "1")
                .env("RUST_LOG", "info");
            if check {
                command.arg("--check-config");
            }
            let output = command.output().expect("the binary runs");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let mode = if check { "--check-config" } else { "start" };
            if check && !case.found_by_check {
                if !output.status.success() {
                    failures.push(format!("{}: {mode} should pass: {stderr}", case.name));
                }
                continue;
            }
            let one_line = stderr.lines().count() == 1
                && stderr.starts_with("business-connector: ")
                && stderr.contains(case.expected);
            let clean = !stderr.contains("panicked")
                && !stderr.contains("backtrace")
                && !stdout.contains("serving");
            if output.status.code() != Some(1) || !one_line || !clean {
                failures.push(format!(
                    "{} ({mode}): exit {:?}, stderr {stderr:?}, stdout {stdout:?}",
                    case.name,
                    output.status.code()
                ));
            }
        }
    }
    drop(busy);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The shipped locked-down example names files that do not exist on a test machine:
/// `--check-config` says so instead of "config OK".
#[test]
fn check_config_reads_the_files_of_the_secure_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/secure.example.toml");
    let output = Command::new(BINARY)
        .args(["--config", example, "--check-config"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        "business-connector: tls.cert_file /etc/business-connector/server.pem: I/O error: No such file or directory (os error 2)\n"
    );
}
