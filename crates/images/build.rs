//! Turns `GWORKER_SLOW_TESTS=1` into `cfg(gworker_slow_tests)`, so the slow
//! debian-slim test is `#[ignore]`d (and listed as such) unless asked for.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(gworker_slow_tests)");
    println!("cargo::rerun-if-env-changed=GWORKER_SLOW_TESTS");
    if std::env::var("GWORKER_SLOW_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=gworker_slow_tests");
    }
}
