//! A job's report as one HTML page (`GET /jobs/{id}/report/{model}`): the Markdown that
//! `eval::report` writes, rendered by pulldown-cmark with raw HTML shown as text (a report names
//! uploaded files) and its pictures inlined as `data:` URIs. The page needs no further request,
//! so it opens whole from a download or a `blob:` tab, without the API key.
//!
//! A `blob:` tab keeps the studio's Content-Security-Policy, so the page's one stylesheet is
//! allowed there by its hash ([`STYLE_SOURCE`]), and table alignment is a class of it, not a
//! `style` attribute (which a hash cannot allow).

use std::sync::LazyLock;

use base64::Engine as _;
use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd, html::push_html};
use sha2::Digest;

/// The page's stylesheet, its only one.
const STYLE: &str = "body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1rem auto; padding: 0 1rem; } \
                     table { border-collapse: collapse; } td, th { border: 1px solid #999; padding: .2rem .5rem; } \
                     img { max-width: 100%; } .left { text-align: left; } .center { text-align: center; } \
                     .right { text-align: right; }";

/// The CSP source that allows [`STYLE`] and nothing else: `'sha256-…'`.
pub static STYLE_SOURCE: LazyLock<String> = LazyLock::new(|| {
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(STYLE)))
});

/// The report's own Content-Security-Policy: it runs nothing and fetches nothing.
pub fn content_security_policy() -> String {
    format!("default-src 'none'; img-src data:; style-src {}", *STYLE_SOURCE)
}

/// `markdown` as a whole HTML page titled `title`; `picture` gives the PNG bytes of an image's
/// path as the Markdown names it (None: shown as missing).
pub fn html(title: &str, markdown: &str, picture: impl Fn(&str) -> Option<Vec<u8>>) -> String {
    let mut out = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    );
    let mut missing = false;
    let events = Parser::new_ext(markdown, Options::ENABLE_TABLES).map(|event| match event {
        // Raw HTML in a report is text someone uploaded: shown, never interpreted.
        Event::Html(s) | Event::InlineHtml(s) => Event::Text(s),
        Event::Start(Tag::Image { link_type, dest_url, title, id }) => {
            let dest_url = match picture(&dest_url) {
                Some(png) => {
                    missing = false;
                    CowStr::from(format!(
                        "data:image/png;base64,{}",
                        base64::engine::general_purpose::STANDARD.encode(png)
                    ))
                }
                None => {
                    missing = true;
                    return Event::Text("(".into());
                }
            };
            Event::Start(Tag::Image { link_type, dest_url, title, id })
        }
        Event::End(TagEnd::Image) if missing => {
            missing = false;
            Event::Text(": picture missing)".into())
        }
        e => e,
    });
    let mut body = String::new();
    push_html(&mut body, events);
    // pulldown-cmark's only `style` attributes are a table column's alignment (a report's own
    // text is escaped, so it cannot hold one).
    for side in ["left", "center", "right"] {
        body = body.replace(&format!(" style=\"text-align: {side}\""), &format!(" class=\"{side}\""));
    }
    out.push_str(&body);
    out.push_str("</body>\n</html>\n");
    out
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let _ = pulldown_cmark_escape::escape_html(&mut out, text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reports_markdown_becomes_escaped_html_with_its_pictures_inside() {
        let md = "# LabelFool evaluation: tiny\n\nImages: `/data/<x>`. Command:\n\n```\nlabelfool eval --x <y>\n```\n\n\
                  > **Interrupted**: partial.\n\n## Attack rate\n\nA paragraph\non two lines.\n\n\
                  | method | rate |\n|---|---:|\n| fgsm | 50.0% |\n| <script>alert(1)</script> | 1 |\n\n\
                  ![Attack rate per method](charts/attack_rate.png)\n\n![gone](charts/none.png)\n\n\
                  - `a<b.jpg` (fgsm): failed\n";
        let page = html("Job <1>", md, |p| (p == "charts/attack_rate.png").then(|| vec![1, 2, 3]));
        assert!(page.contains("<title>Job &lt;1&gt;</title>"), "{page}");
        assert!(page.contains("<h1>LabelFool evaluation: tiny</h1>"), "{page}");
        assert!(page.contains("<p>Images: <code>/data/&lt;x&gt;</code>. Command:</p>"), "{page}");
        assert!(page.contains("<pre><code>labelfool eval --x &lt;y&gt;\n</code></pre>"), "{page}");
        assert!(page.contains("<strong>Interrupted</strong>: partial."), "{page}");
        assert!(page.contains("<th class=\"right\">rate</th>"), "{page}");
        assert!(page.contains("<td>fgsm</td><td class=\"right\">50.0%</td>"), "{page}");
        assert!(!page.contains("style=\""), "no style attribute, which a CSP hash cannot allow: {page}");
        assert!(!page.contains("<script>") && page.contains("&lt;script&gt;"), "{page}");
        assert!(page.contains("<img src=\"data:image/png;base64,AQID\" alt=\"Attack rate per method\""), "{page}");
        assert!(page.contains("(gone: picture missing)"), "{page}");
        assert!(page.contains("<li><code>a&lt;b.jpg</code> (fgsm): failed</li>"), "{page}");
        assert!(!page.contains("|---") && !page.contains("]("), "{page}");
    }

    #[test]
    fn the_style_source_is_the_hash_of_the_pages_one_stylesheet() {
        let page = html("t", "x", |_| None);
        let (start, end) = (page.find("<style>").unwrap() + 7, page.find("</style>").unwrap());
        let digest = sha2::Sha256::digest(&page[start..end]);
        let want = format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest));
        assert_eq!(*STYLE_SOURCE, want);
        assert_eq!(page.matches("<style").count(), 1, "{page}");
        assert!(content_security_policy().ends_with(&format!("style-src {want}")));
    }
}
