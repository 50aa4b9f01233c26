//! A small, bounded XML tree for the two XML dialects the gateway reads: the
//! northbound Business Connector request and CUCM's EM API responses.
//!
//! Both documents are tiny (a body limit applies before parsing), and both must be read
//! tolerantly: unknown elements ignored, any order, whitespace anywhere. A tree makes
//! that trivial and keeps the dialect code declarative ("first `userID` below
//! `device`"). Entities other than XML's five predefined ones and character references
//! are rejected, so no entity expansion is possible; DOCTYPE declarations are ignored.

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::Event;
use quick_xml::Reader;

/// Deeper documents than this are refused: neither dialect nests more than 5 levels.
const MAX_DEPTH: usize = 32;
/// More elements than this are refused: a batch query for 1000 devices fits easily.
const MAX_ELEMENTS: usize = 20_000;

/// More attributes than this on one element are refused: neither dialect uses more
/// than two, and the parser's duplicate-attribute check is quadratic in their number.
const MAX_ATTRIBUTES: usize = 32;

/// Parse errors say where, never what: the input carries the application password and
/// PINs, and a quoted fragment of it (an entity name, a tag name, the parser's own
/// message) would reach the caller's answer and the log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    /// The byte offset where reading stopped.
    #[error("malformed XML at byte {0}")]
    Malformed(u64),
    #[error("the document has no root element")]
    NoRoot,
    #[error("the document nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the document has more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("an element has more than {MAX_ATTRIBUTES} attributes")]
    TooManyAttributes,
    /// An entity other than XML's five (its name is input, so only the offset is kept).
    #[error("unknown entity at byte {0}")]
    UnknownEntity(u64),
}

/// One element: its name, attributes, text (concatenated, trimmed) and children.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The first direct child with this name (names are case sensitive).
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every direct child with this name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The first element with this name at any depth below this one (pre-order).
    pub fn descendant(&self, name: &str) -> Option<&Element> {
        for c in &self.children {
            if c.name == name {
                return Some(c);
            }
            if let Some(found) = c.descendant(name) {
                return Some(found);
            }
        }
        None
    }

    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole document into its root element.
pub fn parse(input: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(input);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.expand_empty_elements = false;

    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut elements = 0usize;
    loop {
        // Errors keep only the offset (see `XmlError`).
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|_| XmlError::Malformed(reader.error_position()))?;
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                if root.is_some() {
                    // Content after the root element.
                    return Err(XmlError::Malformed(at));
                }
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(XmlError::TooManyElements);
                }
                let mut element = Element {
                    name: String::from_utf8_lossy(start.name().as_ref()).into_owned(),
                    ..Element::default()
                };
                for (index, attribute) in start.attributes().enumerate() {
                    if index >= MAX_ATTRIBUTES {
                        return Err(XmlError::TooManyAttributes);
                    }
                    let attribute = attribute.map_err(malformed_at(at))?;
                    let key = String::from_utf8_lossy(attribute.key.as_ref()).into_owned();
                    let value = attribute
                        .unescape_value()
                        .map_err(malformed_at(at))?
                        .into_owned();
                    element.attributes.push((key, value));
                }
                if matches!(event, Event::Empty(_)) {
                    close(element, &mut stack, &mut root);
                } else {
                    if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    stack.push(element);
                }
            }
            Event::End(_) => {
                // An unbalanced end tag.
                let element = stack.pop().ok_or(XmlError::Malformed(at))?;
                close(element, &mut stack, &mut root);
            }
            Event::Text(text) => {
                let text = text.xml_content().map_err(malformed_at(at))?;
                push_text(&mut stack, &text, at)?;
            }
            Event::CData(data) => {
                let text = data.decode().map_err(malformed_at(at))?;
                push_text(&mut stack, &text, at)?;
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref().map_err(malformed_at(at))? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = reference.decode().map_err(malformed_at(at))?;
                        resolve_predefined_entity(&name)
                            .ok_or(XmlError::UnknownEntity(at))?
                            .to_string()
                    }
                };
                push_text(&mut stack, &resolved, at)?;
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        // An unclosed element: reading stopped at the end.
        return Err(XmlError::Malformed(input.len() as u64));
    }
    let mut root = root.ok_or(XmlError::NoRoot)?;
    trim_texts(&mut root);
    Ok(root)
}

/// Maps any parser error to a `Malformed` at `offset`, dropping the parser's message.
fn malformed_at<E>(offset: u64) -> impl Fn(E) -> XmlError {
    move |_| XmlError::Malformed(offset)
}

fn close(element: Element, stack: &mut [Element], root: &mut Option<Element>) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => *root = Some(element),
    }
}

fn push_text(stack: &mut [Element], text: &str, at: u64) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(element) => {
            element.text.push_str(text);
            Ok(())
        }
        // Whitespace around the root is fine; anything else is not a document.
        None if text.trim().is_empty() => Ok(()),
        None => Err(XmlError::Malformed(at)),
    }
}

fn trim_texts(element: &mut Element) {
    let trimmed = element.text.trim();
    if trimmed.len() != element.text.len() {
        element.text = trimmed.to_string();
    }
    for child in &mut element.children {
        trim_texts(child);
    }
}

/// Cuts a value to `max_chars` characters, marking the cut with `…`: for values
/// echoed into documents and texts, which must stay a sane length.
pub fn shorten(value: &str, max_chars: usize) -> String {
    match value.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_string(),
    }
}

/// Escapes a value for element text or an attribute value.
pub fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.chars().all(is_xml_char) {
        return quick_xml::escape::escape(value);
    }
    // A character XML 1.0 forbids (most C0 controls, U+FFFE, U+FFFF) would make the
    // whole document malformed, escaped or not: it becomes U+FFFD.
    let legal: String = value
        .chars()
        .map(|c| if is_xml_char(c) { c } else { '\u{fffd}' })
        .collect();
    std::borrow::Cow::Owned(quick_xml::escape::escape(&legal).into_owned())
}

/// Whether XML 1.0 allows the character in a document.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{fffe}' && c != '\u{ffff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_elements_attributes_and_entities() {
        let root = parse(
            "<?xml version='1.0'?>\n<response><device name=\"SEP1&amp;2\"> \
             <userID>a&lt;b&#x41;</userID><none/></device></response>",
        )
        .unwrap();
        assert_eq!(root.name, "response");
        let device = root.child("device").unwrap();
        assert_eq!(device.attribute("name"), Some("SEP1&2"));
        assert_eq!(device.child("userID").unwrap().text, "a<bA");
        assert!(device.child("none").is_some());
        assert_eq!(root.descendant("userID").unwrap().text, "a<bA");
    }

    #[test]
    fn cdata_is_text() {
        let root = parse("<request><userID><![CDATA[x<y]]></userID></request>").unwrap();
        assert_eq!(root.child("userID").unwrap().text, "x<y");
    }

    #[test]
    fn rejects_malformed_and_unknown_entities() {
        assert!(matches!(parse("<a><b></a>"), Err(XmlError::Malformed(_))));
        assert!(matches!(parse("<a>"), Err(XmlError::Malformed(_))));
        assert_eq!(parse(""), Err(XmlError::NoRoot));
        assert_eq!(parse("   "), Err(XmlError::NoRoot));
        assert!(matches!(parse("not xml"), Err(XmlError::Malformed(_))));
        assert!(matches!(parse("<a/><b/>"), Err(XmlError::Malformed(_))));
        assert!(matches!(
            parse("<!DOCTYPE a [<!ENTITY x \"boom\">]><a>&x;</a>"),
            Err(XmlError::UnknownEntity(_))
        ));
    }

    #[test]
    fn errors_never_quote_the_input() {
        // Secrets sit in element text: no error text may carry any of it.
        for input in [
            "<request><appCertificate>Zq9&SECRETx7;</appCertificate></request>",
            "<request><appCertificate>Zq9<SECRETx7</appCertificate></request>",
            "<request><pin>12<SECRETx7>34</pin></request>",
            "<request><pin>SECRETx7</pn></request>",
            "<request><pin>&#xSECRETx7;</pin></request>",
            "<request a=\"SECRETx7\" a=\"SECRETx7\"><pin/></request>",
            "<request><pin>SECRETx7",
            "SECRETx7",
        ] {
            let error = parse(input).unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("SECRET"), "{input}: {shown}");
        }
    }

    #[test]
    fn bounds_attributes_per_element() {
        let many: String = (0..40).map(|i| format!(" a{i}=\"v\"")).collect();
        assert_eq!(
            parse(&format!("<a{many}/>")),
            Err(XmlError::TooManyAttributes)
        );
        let few: String = (0..32).map(|i| format!(" a{i}=\"v\"")).collect();
        assert_eq!(parse(&format!("<a{few}/>")).unwrap().attributes.len(), 32);
    }

    #[test]
    fn bounds_depth() {
        let deep = "<a>".repeat(40) + &"</a>".repeat(40);
        assert_eq!(parse(&deep), Err(XmlError::TooDeep));
    }

    #[test]
    fn shortens_on_character_boundaries() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("ééé", 2), "éé…");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("<a&'\">"), "&lt;a&amp;&apos;&quot;&gt;");
        assert_eq!(
            escape("a\u{1}b\0<\u{ffff}"),
            "a\u{fffd}b\u{fffd}&lt;\u{fffd}"
        );
        assert_eq!(escape("tab\tline\n"), "tab\tline\n");
    }
}
