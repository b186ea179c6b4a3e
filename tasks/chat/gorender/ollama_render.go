// ollama_render renders chat prompts the way Ollama does: Go's text/template with Ollama's values.
//
// It is loraship's stand-in for the Ollama server's prompt step (the Ollama binary cannot run where the
// pipeline runs). Standard library only. It reads one JSON request from stdin:
//
//	{"template": "...", "requests": [{"messages": [{"role": "user", "content": "..."}]}, ...]}
//
// and writes {"results": [{"prompt": "..."} | {"error": "..."}], "vars": [...], "mode": "messages|legacy"}
// (or {"error": "..."} with exit status 2 when the template does not parse).
//
// What it mirrors of Ollama's template package (behaviour, re-implemented here):
//   - parsing: option missingkey=zero and the "json" function; a template that names neither
//     .Messages nor .Response gets {{ .Response }} appended;
//   - messages are collated: every system message's content is joined with "\n\n" into .System, and
//     consecutive messages of the same role (tool messages excepted) are merged with "\n\n";
//   - a template that names .Messages is executed once with System, Messages, Tools, Response "",
//     Think, IsThinkSet;
//   - any other ("legacy") template is executed once per user/assistant exchange with System, Prompt and
//     Response, and for the last exchange only up to the first {{ .Response }} (the reply is generated
//     from there).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
)

// Message carries the fields Ollama's api.Message exposes to templates.
type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking"`
	ToolName  string `json:"tool_name"`
	Images    []any  `json:"images"`
	ToolCalls []any  `json:"tool_calls"`
}

type request struct {
	Messages []Message `json:"messages"`
	Think    bool      `json:"think"`
}

type input struct {
	Template string    `json:"template"`
	Requests []request `json:"requests"`
}

type result struct {
	Prompt *string `json:"prompt,omitempty"`
	Error  string  `json:"error,omitempty"`
}

type output struct {
	Mode    string   `json:"mode,omitempty"`
	Vars    []string `json:"vars,omitempty"`
	Results []result `json:"results,omitempty"`
	Error   string   `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// identifiers lists every field and variable name used in a node, recursively.
func identifiers(n parse.Node) []string {
	var out []string
	switch n := n.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				out = append(out, identifiers(c)...)
			}
		}
	case *parse.ActionNode:
		out = identifiers(n.Pipe)
	case *parse.TemplateNode:
		if n.Pipe != nil {
			out = identifiers(n.Pipe)
		}
	case *parse.IfNode:
		out = branch(&n.BranchNode)
	case *parse.RangeNode:
		out = branch(&n.BranchNode)
	case *parse.WithNode:
		out = branch(&n.BranchNode)
	case *parse.PipeNode:
		if n != nil {
			for _, c := range n.Cmds {
				for _, a := range c.Args {
					out = append(out, identifiers(a)...)
				}
			}
		}
	case *parse.FieldNode:
		out = n.Ident
	case *parse.VariableNode:
		out = n.Ident
	case *parse.ChainNode:
		out = append(identifiers(n.Node), n.Field...)
	}
	return out
}

func branch(b *parse.BranchNode) []string {
	out := identifiers(b.Pipe)
	out = append(out, identifiers(b.List)...)
	if b.ElseList != nil {
		out = append(out, identifiers(b.ElseList)...)
	}
	return out
}

func vars(t *template.Template) []string {
	seen := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, id := range identifiers(tt.Tree.Root) {
			seen[strings.ToLower(id)] = true
		}
	}
	names := make([]string, 0, len(seen))
	for k := range seen {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func parseTemplate(text string) (*template.Template, []string, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(text)
	if err != nil {
		return nil, nil, err
	}
	names := vars(t)
	if !contains(names, "messages") && !contains(names, "response") {
		// as Ollama does: a template without a place for the reply gets one at its end
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, responseNode())
	}
	return t, names, nil
}

func responseNode() parse.Node {
	field := &parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}
	cmd := &parse.CommandNode{NodeType: parse.NodeCommand, Args: []parse.Node{field}}
	pipe := &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{cmd}}
	return &parse.ActionNode{NodeType: parse.NodeAction, Pipe: pipe}
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
			continue
		}
		copied := m
		out = append(out, &copied)
	}
	return strings.Join(system, "\n\n"), out
}

// cutAfterResponse drops, depth first, every node from the first {{ .Response }} field on.
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if cut {
			return nil
		}
		switch t := n.(type) {
		case *parse.FieldNode:
			if contains(t.Ident, "Response") {
				cut = true
				return nil
			}
		case *parse.ListNode:
			var kept []parse.Node
			for _, c := range t.Nodes {
				if k := walk(c); k != nil {
					kept = append(kept, k)
				}
			}
			t.Nodes = kept
			return t
		case *parse.IfNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.RangeNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.WithNode:
			walkBranch(&t.BranchNode, walk)
		case *parse.ActionNode:
			p := walk(t.Pipe)
			if p == nil {
				return nil
			}
			t.Pipe = p.(*parse.PipeNode)
		case *parse.PipeNode:
			var cmds []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if k := walk(a); k != nil {
						args = append(args, k)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				cmds = append(cmds, c)
			}
			if len(cmds) == 0 {
				return nil
			}
			t.Cmds = cmds
		}
		return n
	}
	walk(root)
	return root
}

func walkBranch(b *parse.BranchNode, walk func(parse.Node) parse.Node) {
	if l := walk(b.List); l != nil {
		b.List = l.(*parse.ListNode)
	} else {
		b.List = &parse.ListNode{NodeType: parse.NodeList}
	}
	if b.ElseList != nil {
		if l := walk(b.ElseList); l != nil {
			b.ElseList = l.(*parse.ListNode)
		}
	}
}

func render(text string, req request) (string, error) {
	t, names, err := parseTemplate(text)
	if err != nil {
		return "", err
	}
	system, msgs := collate(req.Messages)
	var b bytes.Buffer
	if contains(names, "messages") {
		err := t.Execute(&b, map[string]any{
			"System": system, "Messages": msgs, "Tools": []any(nil), "Response": "",
			"Think": req.Think, "IsThinkSet": false,
		})
		return b.String(), err
	}
	// legacy: one execution per exchange
	sys, prompt, response := "", "", ""
	flush := func() error {
		err := t.Execute(&b, map[string]any{"System": sys, "Prompt": prompt, "Response": response,
			"Think": req.Think, "IsThinkSet": false})
		sys, prompt, response = "", "", ""
		return err
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			sys = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	last, _, err := parseTemplate(text)
	if err != nil {
		return "", err
	}
	tree := &parse.Tree{Root: cutAfterResponse(last.Tree.Root.CopyList())}
	tail, err := template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("", tree)
	if err != nil {
		return "", err
	}
	err = tail.Execute(&b, map[string]any{"System": sys, "Prompt": prompt, "Response": response,
		"Think": req.Think, "IsThinkSet": false})
	return b.String(), err
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	var in input
	if err == nil {
		err = json.Unmarshal(raw, &in)
	}
	if err != nil {
		enc.Encode(output{Error: fmt.Sprintf("bad request: %v", err)})
		os.Exit(2)
	}
	t, names, err := parseTemplate(in.Template)
	if err != nil {
		enc.Encode(output{Error: err.Error()})
		os.Exit(2)
	}
	_ = t
	out := output{Vars: names, Mode: "legacy"}
	if contains(names, "messages") {
		out.Mode = "messages"
	}
	for _, req := range in.Requests {
		prompt, err := render(in.Template, req)
		if err != nil {
			out.Results = append(out.Results, result{Error: err.Error()})
			continue
		}
		p := prompt
		out.Results = append(out.Results, result{Prompt: &p})
	}
	enc.Encode(out)
}
