//! Boot, then the tests.

use bare::println;

#[no_mangle]
extern "C" fn bare_main(start_info: u64) -> ! {
    println!("guest: hello from long mode, start info at {start_info:#x}");
    bare::exit::qemu_exit(bare::exit::EXIT_SUCCESS)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    bare::serial::print_unlocked(format_args!("\nPANIC: {info}\n"));
    bare::exit::qemu_exit(bare::exit::EXIT_FAILURE)
}
