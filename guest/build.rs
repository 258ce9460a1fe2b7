// Links the bare-metal build at 1 MiB with the shared linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../bare/linker.ld");
    }
    println!("cargo:rerun-if-changed=../bare/linker.ld");
}
