// A small Markdown renderer for model answers. It builds DOM nodes with
// createElement and textContent only: model output is never parsed as HTML, so
// `<img src=x onerror=…>` in an answer is shown as text.
"use strict";

const Markdown = (() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const SAFE_LINK = /^(https?:|mailto:)/i;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Inline spans: `code`, **bold**, __bold__, *italic*, _italic_, ~~strike~~, [text](url).
  function renderInline(text, parent) {
    let plain = "";
    const flush = () => {
      if (plain) parent.appendChild(document.createTextNode(plain));
      plain = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && i + 1 < text.length && /[\\`*_~\[\]()#>+\-.!]/.test(text[i + 1])) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        const run = /^`+/.exec(text.slice(i))[0];
        const end = text.indexOf(run, i + run.length);
        if (end !== -1) {
          flush();
          parent.appendChild(el("code", "", text.slice(i + run.length, end).replace(/^ (.*) $/, "$1")));
          i = end + run.length;
          continue;
        }
      }
      const pair = spanAt(text, i);
      if (pair) {
        flush();
        const node = el(pair.tag);
        renderInline(pair.inner, node);
        parent.appendChild(node);
        i = pair.end;
        continue;
      }
      if (c === "[") {
        const link = /^\[([^\]\n]+)\]\(([^)\s]+)\)/.exec(text.slice(i));
        if (link && SAFE_LINK.test(link[2])) {
          flush();
          const a = el("a");
          a.href = link[2];
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          renderInline(link[1], a);
          parent.appendChild(a);
          i += link[0].length;
          continue;
        }
      }
      plain += c;
      i += 1;
    }
    flush();
  }

  // An emphasis span opening at `i`, with its closing delimiter on the same text.
  function spanAt(text, i) {
    for (const [mark, tag] of [["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"]]) {
      if (!text.startsWith(mark, i)) continue;
      const start = i + mark.length;
      if (start >= text.length || /\s/.test(text[start])) continue;
      // Underscores inside words (snake_case) are not emphasis.
      if (mark[0] === "_" && i > 0 && /\w/.test(text[i - 1])) continue;
      let end = text.indexOf(mark, start + 1);
      while (end !== -1 && (/\s/.test(text[end - 1]) || (mark.length === 1 && text[end + 1] === mark))) {
        end = text.indexOf(mark, end + 2);
      }
      if (end === -1) continue;
      if (mark[0] === "_" && /\w/.test(text[end + mark.length] || "")) continue;
      return { tag, inner: text.slice(start, end), end: end + mark.length };
    }
    return null;
  }

  function codeBlock(lines, language, closed) {
    const wrap = el("div", "codeblock");
    const bar = el("div", "codebar");
    bar.appendChild(el("span", "lang", language || "code"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.dataset.code = lines.join("\n");
    bar.appendChild(copy);
    wrap.appendChild(bar);
    const pre = el("pre");
    const code = el("code", "", lines.join("\n"));
    if (!closed) wrap.classList.add("open");
    pre.appendChild(code);
    wrap.appendChild(pre);
    return wrap;
  }

  function paragraph(lines) {
    const p = el("p");
    lines.forEach((line, n) => {
      if (n > 0) p.appendChild(el("br"));
      renderInline(line, p);
    });
    return p;
  }

  // Lists nest by indentation: an item indented deeper than its parent's marker opens a sublist.
  function list(items) {
    const root = { indent: -1, node: null, children: [] };
    const stack = [root];
    for (const item of items) {
      while (stack.length > 1 && item.indent <= stack[stack.length - 1].indent) stack.pop();
      const parent = stack[stack.length - 1];
      const entry = { ...item, children: [] };
      parent.children.push(entry);
      stack.push(entry);
    }
    const build = (entries) => {
      const ordered = /\d/.test(entries[0].marker);
      const node = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(entries[0].marker, 10) !== 1) node.start = parseInt(entries[0].marker, 10);
      for (const entry of entries) {
        const li = el("li");
        renderInline(entry.text, li);
        if (entry.children.length) li.appendChild(build(entry.children));
        node.appendChild(li);
      }
      return node;
    };
    return build(root.children);
  }

  // Renders `source` into a DocumentFragment. An unclosed code fence (an answer still
  // streaming) renders as a code block up to the end of the text.
  function render(source) {
    const out = document.createDocumentFragment();
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const endParagraph = () => {
      if (para.length) out.appendChild(paragraph(para));
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        endParagraph();
        const body = [];
        const close = new RegExp("^ {0,3}" + fence[1][0] + "{" + fence[1].length + ",}\\s*$");
        i += 1;
        let closed = false;
        while (i < lines.length) {
          if (close.test(lines[i])) {
            closed = true;
            i += 1;
            break;
          }
          body.push(lines[i]);
          i += 1;
        }
        out.appendChild(codeBlock(body, fence[2], closed));
        continue;
      }
      if (!line.trim()) {
        endParagraph();
        i += 1;
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        endParagraph();
        const h = el("h" + Math.min(heading[1].length + 2, 6));
        renderInline(heading[2], h);
        out.appendChild(h);
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        endParagraph();
        out.appendChild(el("hr"));
        i += 1;
        continue;
      }
      if (QUOTE.test(line)) {
        endParagraph();
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) quoted.push(QUOTE.exec(lines[i++])[1]);
        const q = el("blockquote");
        q.appendChild(render(quoted.join("\n")));
        out.appendChild(q);
        continue;
      }
      if (LIST_ITEM.test(line)) {
        endParagraph();
        const items = [];
        while (i < lines.length) {
          const m = LIST_ITEM.exec(lines[i]);
          if (m) {
            items.push({ indent: m[1].replace(/\t/g, "    ").length, marker: m[2], text: m[3] });
          } else if (lines[i].trim() && /^\s+/.test(lines[i]) && items.length) {
            items[items.length - 1].text += " " + lines[i].trim(); // a wrapped item
          } else {
            break;
          }
          i += 1;
        }
        out.appendChild(list(items));
        continue;
      }
      para.push(line);
      i += 1;
    }
    endParagraph();
    return out;
  }

  return { render, renderInline };
})();
