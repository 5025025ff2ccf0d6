//! How the binary reports an error, seen from outside: one line, each cause once, no ANSI
//! colour when stderr is not a terminal (here: a pipe), and one JSON object per line with
//! `--log-format json`.

use std::process::Command;

fn stderr_of(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-ipvs-bpf"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kube-ipvs-bpf");
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8(out.stderr).expect("UTF-8 stderr")
}

#[test]
fn an_error_is_one_plain_line_with_each_cause_once() {
    for args in [
        &[
            "cleanup",
            "--dry-run",
            "--config",
            "/nonexistent/config.yaml",
        ][..],
        // kube-proxy's command line.
        &["--config=/nonexistent/config.yaml"],
    ] {
        let err = stderr_of(args);
        assert!(
            !err.contains('\u{1b}'),
            "{args:?}: ANSI escape on a pipe: {err:?}"
        );
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains("ERROR"), "{err}");
        assert!(lines[0].contains("/nonexistent/config.yaml"), "{err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
        assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    }
}

#[test]
fn json_logs_stay_one_object_per_line() {
    let err = stderr_of(&[
        "--log-format",
        "json",
        "cleanup",
        "--dry-run",
        "--config",
        "/nonexistent/config.yaml",
    ]);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON log line");
    assert_eq!(v["level"], "ERROR", "{v}");
    let msg = v["message"].as_str().expect("message");
    assert_eq!(msg.matches("os error 2").count(), 1, "{msg}");
    // kube-proxy's --logging-format=json too.
    let err = stderr_of(&["--logging-format=json", "--config=/nonexistent/config.yaml"]);
    let v: serde_json::Value = serde_json::from_str(err.trim()).expect("a JSON log line");
    assert_eq!(v["level"], "ERROR", "{v}");
}
