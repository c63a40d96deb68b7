//! Output of the in-testbed check scripts: sections
//!   === NAME
//!   ...output...
//!   === NAME rc=N

use std::collections::HashMap;

/// Splits the script's output into sections: name -> (output, rc).
pub fn sections(out: &str) -> HashMap<String, (String, Option<i32>)> {
    let mut map = HashMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("=== ") {
            if let Some((name, rc)) = rest.rsplit_once(" rc=") {
                if let Some((n, text)) = cur.take() {
                    if n == name {
                        map.insert(n, (text, rc.trim().parse().ok()));
                        continue;
                    }
                }
            }
            if let Some((n, text)) = cur.take() {
                map.insert(n, (text, None));
            }
            cur = Some((rest.to_string(), String::new()));
        } else if let Some((_, text)) = cur.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((n, text)) = cur {
        map.insert(n, (text, None));
    }
    map
}

/// The last `n` lines of `text`, after a line saying how many were left out: what an
/// assertion message quotes of a long output (CI keeps only the end of a log).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[{skip} lines before these]\n"));
    }
    out.push_str(&lines[skip..].join("\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse() {
        let s = sections("noise\n=== a\nx\ny\n=== a rc=3\n=== b\nz\n=== b rc=0\n=== c\nw\n");
        assert_eq!(s["a"], ("x\ny\n".to_string(), Some(3)));
        assert_eq!(s["b"], ("z\n".to_string(), Some(0)));
        assert_eq!(s["c"], ("w\n".to_string(), None));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "[1 lines before these]\nb\nc");
        assert_eq!(tail("a\nb", 5), "a\nb");
        assert_eq!(tail("", 3), "");
    }
}
