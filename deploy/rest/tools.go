package main

// Tool calling in OpenAI's JSON shapes: request bodies are type-checked (tools, tool_choice, the tool fields of
// messages) and tool_choice's plain strings become the proto's {"mode": ...}; responses drop the empty tool fields
// that the marshaler writes (EmitDefaults), so messages without calls look like OpenAI's, a message with calls has
// "content": null when it has no text, and a stream's tool-call deltas name id, type and function.name only in a
// call's first delta.

import (
	"fmt"
)

// normalizeTools checks tools and tool_choice of a chat body and rewrites tool_choice "auto" / "none" /
// "required" into the proto's ToolChoice {"mode": ...}. The gateway validates the values.
func normalizeTools(body map[string]interface{}) *bodyError {
	if v, ok := body["tools"]; ok {
		list, ok := v.([]interface{})
		if !ok {
			return invalidType("tools", "an array of tools", v)
		}
		for i, item := range list {
			field := fmt.Sprintf("tools[%d]", i)
			tool, ok := item.(map[string]interface{})
			if !ok {
				return invalidType(field, "an object with type and function", item)
			}
			dropNulls(tool)
			if err := stringField(tool, "type", field+".type"); err != nil {
				return err
			}
			fn, ok := tool["function"].(map[string]interface{})
			if !ok {
				return invalidType(field+".function", "an object with name, description and parameters",
					tool["function"])
			}
			dropNulls(fn)
			for _, key := range []string{"name", "description"} {
				if err := stringField(fn, key, field+".function."+key); err != nil {
					return err
				}
			}
			if p, present := fn["parameters"]; present {
				if _, ok := p.(map[string]interface{}); !ok {
					return invalidType(field+".function.parameters", "a JSON Schema (an object)", p)
				}
			}
			if s, present := fn["strict"]; present {
				if _, ok := s.(bool); !ok {
					return invalidType(field+".function.strict", "a boolean", s)
				}
			}
		}
	}
	switch choice := body["tool_choice"].(type) {
	case nil:
	case string:
		body["tool_choice"] = map[string]interface{}{"mode": choice}
	case map[string]interface{}:
		dropNulls(choice)
		if err := stringField(choice, "type", "tool_choice.type"); err != nil {
			return err
		}
		if fn, present := choice["function"]; present {
			f, ok := fn.(map[string]interface{})
			if !ok {
				return invalidType("tool_choice.function", "an object with name", fn)
			}
			if err := stringField(f, "name", "tool_choice.function.name"); err != nil {
				return err
			}
		}
	default:
		return invalidType("tool_choice", "a string (none, auto, required) or an object", choice)
	}
	return nil
}

// normalizeToolFields checks the tool fields of one chat message (field is "messages[i]").
func normalizeToolFields(m map[string]interface{}, field string) *bodyError {
	if err := stringField(m, "tool_call_id", field+".tool_call_id"); err != nil {
		return err
	}
	v, ok := m["tool_calls"]
	if !ok {
		return nil
	}
	if v == nil {
		delete(m, "tool_calls")
		return nil
	}
	calls, ok := v.([]interface{})
	if !ok {
		return invalidType(field+".tool_calls", "an array of tool calls", v)
	}
	for j, item := range calls {
		where := fmt.Sprintf("%s.tool_calls[%d]", field, j)
		call, ok := item.(map[string]interface{})
		if !ok {
			return invalidType(where, "an object with id, type and function", item)
		}
		dropNulls(call)
		for _, key := range []string{"id", "type"} {
			if err := stringField(call, key, where+"."+key); err != nil {
				return err
			}
		}
		fn, ok := call["function"].(map[string]interface{})
		if !ok {
			return invalidType(where+".function", "an object with name and arguments", call["function"])
		}
		dropNulls(fn)
		for _, key := range []string{"name", "arguments"} {
			if err := stringField(fn, key, where+".function."+key); err != nil {
				return err
			}
		}
	}
	return nil
}

// stringField: m[key] absent, or a string (nulls were dropped before).
func stringField(m map[string]interface{}, key, field string) *bodyError {
	v, present := m[key]
	if !present {
		return nil
	}
	if v == nil {
		delete(m, key)
		return nil
	}
	if _, ok := v.(string); !ok {
		return invalidType(field, "a string", v)
	}
	return nil
}

// fixToolFields gives a response choice's message (or a chunk's delta) OpenAI's tool shapes.
func fixToolFields(choice map[string]interface{}) {
	if message, ok := choice["message"].(map[string]interface{}); ok {
		delete(message, "tool_call_id") // only requests have it
		calls, _ := message["tool_calls"].([]interface{})
		if len(calls) == 0 {
			delete(message, "tool_calls")
		} else if content, _ := message["content"].(string); content == "" {
			message["content"] = nil // OpenAI: null content beside tool calls
		}
		if name, ok := message["name"].(string); ok && name == "" {
			delete(message, "name") // answers have no author name
		}
	}
	delta, ok := choice["delta"].(map[string]interface{})
	if !ok {
		return
	}
	calls, _ := delta["tool_calls"].([]interface{})
	if len(calls) == 0 {
		delete(delta, "tool_calls")
		return
	}
	for _, c := range calls {
		call, ok := c.(map[string]interface{})
		if !ok {
			continue
		}
		for _, key := range []string{"id", "type"} {
			if s, _ := call[key].(string); s == "" {
				delete(call, key) // only a call's first delta has them
			}
		}
		if fn, ok := call["function"].(map[string]interface{}); ok {
			if s, _ := fn["name"].(string); s == "" {
				delete(fn, "name")
			}
		}
	}
	if content, _ := delta["content"].(string); content == "" {
		delete(delta, "content") // a delta of tool calls only
	}
}
