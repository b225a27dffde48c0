//! The browser entry point: hydrates the HTML that the server rendered with `app::App`.

/// Called by the generated JS loader once the WASM module is instantiated.
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
