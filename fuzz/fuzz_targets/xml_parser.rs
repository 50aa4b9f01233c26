//! Bytes → `actors::xml::parse`: the tree for both XML dialects. Checks its bounds
//! (depth ≤ 32, ≤ 20,000 elements) and that texts are trimmed.
#![no_main]

use actors::xml::{parse, Element};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    if let Ok(root) = parse(&input) {
        let mut elements = 0;
        walk(&root, 1, &mut elements);
        assert!(elements <= 20_000, "{elements} elements");
        // `descendant` recurses too: it must terminate on whatever parsed.
        let _ = root.descendant("deviceName");
    }
});

fn walk(element: &Element, depth: usize, elements: &mut usize) {
    // Empty elements may sit one level below the deepest open one.
    assert!(depth <= 33, "depth {depth}");
    assert_eq!(element.text, element.text.trim());
    *elements += 1;
    for child in &element.children {
        walk(child, depth + 1, elements);
    }
}
