//! A job's report as one HTML page (`GET /jobs/{id}/report/{model}`): the Markdown that
//! `eval::report` writes — headings, paragraphs, fenced code, quotes, pipe tables, lists, whole-line
//! images, `code` and **bold**, nothing else — rendered with every character of its text escaped
//! (a report names uploaded files), its pictures inlined as `data:` URIs. The page needs no
//! further request, so it opens whole from a download or a `blob:` tab, without the API key.

use std::fmt::Write as _;

use base64::Engine as _;

/// `markdown` as a whole HTML page titled `title`; `picture` gives the PNG bytes of an image's
/// path as the Markdown names it (None: shown as missing).
pub fn html(title: &str, markdown: &str, picture: impl Fn(&str) -> Option<Vec<u8>>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <style>body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 1rem auto; padding: 0 1rem; }} \
         table {{ border-collapse: collapse; }} td, th {{ padding: .2rem .5rem; }} img {{ max-width: 100%; }}</style>\n\
         </head>\n<body>\n",
        escape(title)
    );
    let lines: Vec<&str> = markdown.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim();
        if t.is_empty() {
            i += 1;
        } else if t.starts_with("```") {
            let end = (i + 1..lines.len()).find(|&j| lines[j].trim().starts_with("```")).unwrap_or(lines.len());
            let code: Vec<String> = lines[i + 1..end].iter().map(|l| escape(l)).collect();
            let _ = writeln!(out, "<pre><code>{}</code></pre>", code.join("\n"));
            i = end + 1;
        } else if let Some((level, text)) = heading(t) {
            let _ = writeln!(out, "<h{level}>{}</h{level}>", inline(text));
            i += 1;
        } else if t.starts_with('>') {
            let end = run(&lines, i, |l| l.trim().starts_with('>'));
            let text: Vec<&str> = lines[i..end].iter().map(|l| l.trim().trim_start_matches('>').trim()).collect();
            let _ = writeln!(out, "<blockquote><p>{}</p></blockquote>", inline(&text.join(" ")));
            i = end;
        } else if t.starts_with('|') {
            let end = run(&lines, i, |l| l.trim().starts_with('|'));
            out.push_str(&table(&lines[i..end]));
            i = end;
        } else if t.starts_with("- ") {
            let end = run(&lines, i, |l| l.trim().starts_with("- "));
            out.push_str("<ul>\n");
            for l in &lines[i..end] {
                let _ = writeln!(out, "<li>{}</li>", inline(&l.trim()[2..]));
            }
            out.push_str("</ul>\n");
            i = end;
        } else if let Some((alt, path)) = image(t) {
            match picture(path) {
                Some(png) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
                    let _ = writeln!(
                        out,
                        "<figure><img src=\"data:image/png;base64,{b64}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                        escape(alt),
                        escape(alt)
                    );
                }
                None => {
                    let _ = writeln!(out, "<p>({}: picture missing)</p>", escape(alt));
                }
            }
            i += 1;
        } else {
            let end = run(&lines, i, |l| !l.trim().is_empty() && !starts_block(l.trim()));
            let end = end.max(i + 1);
            let text: Vec<&str> = lines[i..end].iter().map(|l| l.trim()).collect();
            let _ = writeln!(out, "<p>{}</p>", inline(&text.join(" ")));
            i = end;
        }
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// The index past the lines from `start` on that `keep` holds for.
fn run(lines: &[&str], start: usize, keep: impl Fn(&str) -> bool) -> usize {
    (start..lines.len()).find(|&j| !keep(lines[j])).unwrap_or(lines.len())
}

fn starts_block(t: &str) -> bool {
    t.starts_with("```")
        || heading(t).is_some()
        || t.starts_with('>')
        || t.starts_with('|')
        || t.starts_with("- ")
        || image(t).is_some()
}

/// `# text` to `###### text`: (level, text).
fn heading(t: &str) -> Option<(usize, &str)> {
    let level = t.chars().take_while(|c| *c == '#').count();
    let text = t.get(level..)?.strip_prefix(' ')?;
    (1..=6).contains(&level).then_some((level, text.trim()))
}

/// A whole-line image `![alt](path)`: (alt, path).
fn image(t: &str) -> Option<(&str, &str)> {
    let body = t.strip_prefix("![")?.strip_suffix(')')?;
    let split = body.rfind("](")?;
    Some((&body[..split], &body[split + 2..]))
}

/// A pipe table: the first row is the header; a row of dashes after it sets each column's
/// alignment (`---:` right).
fn table(rows: &[&str]) -> String {
    let cells = |l: &str| -> Vec<String> {
        let t = l.trim();
        let t = t.strip_prefix('|').unwrap_or(t);
        let t = t.strip_suffix('|').unwrap_or(t);
        t.split('|').map(|c| c.trim().to_string()).collect()
    };
    let rule = |c: &[String]| {
        c.iter().all(|x| {
            let x = x.trim_start_matches(':').trim_end_matches(':');
            !x.is_empty() && x.chars().all(|ch| ch == '-')
        })
    };
    let mut out = String::from("<table border=\"1\">\n");
    let head = cells(rows[0]);
    let (aligns, body) = match rows.get(1).map(|r| cells(r)) {
        Some(r) if rule(&r) => (r.iter().map(|x| x.ends_with(':')).collect::<Vec<_>>(), &rows[2..]),
        _ => (Vec::new(), &rows[1..]),
    };
    let align = |k: usize| if aligns.get(k).copied().unwrap_or(false) { " align=\"right\"" } else { "" };
    out.push_str("<thead><tr>");
    for (k, c) in head.iter().enumerate() {
        let _ = write!(out, "<th{}>{}</th>", align(k), inline(c));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for r in body {
        out.push_str("<tr>");
        for (k, c) in cells(r).iter().enumerate() {
            let _ = write!(out, "<td{}>{}</td>", align(k), inline(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
    out
}

/// A line's text: `code` spans and **bold**, everything escaped.
fn inline(text: &str) -> String {
    let parts: Vec<&str> = text.split('`').collect();
    let mut out = String::new();
    for (k, part) in parts.iter().enumerate() {
        // An unmatched last backtick stays a backtick.
        if k % 2 == 1 && k + 1 < parts.len() {
            let _ = write!(out, "<code>{}</code>", escape(part));
        } else {
            if k % 2 == 1 {
                out.push('`');
            }
            out.push_str(&bold(&escape(part)));
        }
    }
    out
}

fn bold(escaped: &str) -> String {
    let parts: Vec<&str> = escaped.split("**").collect();
    let mut out = String::new();
    for (k, part) in parts.iter().enumerate() {
        match (k % 2, k + 1 < parts.len()) {
            (1, true) => {
                let _ = write!(out, "<strong>{part}</strong>");
            }
            (1, false) => {
                out.push_str("**");
                out.push_str(part);
            }
            _ => out.push_str(part),
        }
    }
    out
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
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
        assert!(page.contains("<title>Job &lt;1&gt;</title>"));
        assert!(page.contains("<h1>LabelFool evaluation: tiny</h1>"));
        assert!(page.contains("<p>Images: <code>/data/&lt;x&gt;</code>. Command:</p>"));
        assert!(page.contains("<pre><code>labelfool eval --x &lt;y&gt;</code></pre>"));
        assert!(page.contains("<blockquote><p><strong>Interrupted</strong>: partial.</p></blockquote>"));
        assert!(page.contains("<p>A paragraph on two lines.</p>"));
        assert!(page.contains("<thead><tr><th>method</th><th align=\"right\">rate</th></tr></thead>"));
        assert!(page.contains("<tr><td>fgsm</td><td align=\"right\">50.0%</td></tr>"));
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("<img src=\"data:image/png;base64,AQID\" alt=\"Attack rate per method\">"));
        assert!(page.contains("<p>(gone: picture missing)</p>"));
        assert!(page.contains("<li><code>a&lt;b.jpg</code> (fgsm): failed</li>"));
        assert!(!page.contains("|---") && !page.contains("]("), "{page}");
    }

    #[test]
    fn unmatched_marks_stay_text() {
        assert_eq!(inline("a `b"), "a `b");
        assert_eq!(inline("**a"), "**a");
        assert_eq!(heading("#no"), None);
        assert_eq!(image("![a](b) c"), None);
    }
}
